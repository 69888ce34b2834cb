"""The GPU-resident data path, on the CPU: Poisson batches drawn by index (the law of opacus'
sampler, exactly `steps` batches, empty ones included, ranks' shards partitioning the set);
bf16 autocast of the forward with per-example norms, clipping and sums in fp32; channels_last
convolutions giving book-keeping the contiguous result."""

import itertools

import pytest
import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn

from dpsynth.errors import BadInput
from dpsynth.methods import get_method
from dpsynth.training.bookkeeping import BookKeepingClipping, per_example_gradients
from dpsynth.training.device import prefers_channels_last
from dpsynth.training.distributed import PoissonBatches
from dpsynth.training.dpsgd import DPSGDPlan, PerExampleGradients, train_dp, with_precision
from dpsynth.training.options import FinetuneOptions, check_combination, resolve_options

CLIP = 0.5


def inclusion_counts(batches: PoissonBatches, passes: int = 1) -> torch.Tensor:
    """How often each example of the whole set was drawn (labels are the examples' indices)."""
    counts = torch.zeros(batches.num_samples)
    for _, y in itertools.chain.from_iterable(batches for _ in range(passes)):
        counts[y] += 1
    return counts


def chi_square(counts: torch.Tensor, steps: int, q: float) -> float:
    """sum over examples of the squared z-score of its count against Binomial(steps, q)."""
    return float(((counts - steps * q) ** 2 / (steps * q * (1 - q))).sum())


# ---- sampling ---------------------------------------------------------------------------------------
def test_the_draw_is_opacus_poisson_sampler_on_the_same_rng():
    n, q = 37, 0.3
    torch.manual_seed(3)
    opacus_batches = list(UniformWithReplacementSampler(num_samples=n, sample_rate=q, steps=6))
    torch.manual_seed(3)
    ours = [y.tolist() for _, y in PoissonBatches(torch.zeros(n, 2), torch.arange(n), sample_rate=q, steps=6)]
    assert ours == opacus_batches


def test_each_example_is_drawn_binomially_and_batches_have_binomial_sizes():
    n, q, steps = 60, 0.2, 500
    torch.manual_seed(0)
    batches = PoissonBatches(torch.zeros(n, 1, 2, 2), torch.arange(n), sample_rate=q, steps=steps)
    sizes = [len(x) for x, _ in batches]
    assert len(sizes) == steps
    torch.manual_seed(1)
    counts = inclusion_counts(batches)
    # chi-square with n degrees of freedom: mean 60, sd 11; a fixed-size or shuffled loader fails it
    assert 25 < chi_square(counts, steps, q) < 110
    sizes = torch.tensor(sizes, dtype=torch.float64)
    assert abs(sizes.mean() - n * q) < 4 * (n * q * (1 - q) / steps) ** 0.5
    assert 0.75 < sizes.var() / (n * q * (1 - q)) < 1.3


def test_exactly_steps_batches_empty_ones_with_the_right_shapes_and_dtypes():
    x = torch.randint(0, 256, (9, 3, 4, 4), dtype=torch.uint8)
    batches = PoissonBatches(x, torch.arange(9), sample_rate=1e-12, steps=7)
    drawn = list(batches)
    assert len(drawn) == len(batches) == 7
    for xb, yb in drawn:
        assert xb.shape == (0, 3, 4, 4) and xb.dtype == torch.uint8
        assert yb.shape == (0,) and yb.dtype == torch.int64
    assert len(list(itertools.islice(batches, 3))) == 3  # a resumed epoch takes the first `todo`


def test_two_ranks_partition_the_examples_and_their_union_has_the_one_process_law():
    n, q, steps = 41, 0.25, 400
    x, y = torch.zeros(n, 2), torch.arange(n)
    ranks = [PoissonBatches(x, y, sample_rate=q, steps=steps, rank=r, world_size=2) for r in range(2)]
    assert sorted(torch.cat([r.shard for r in ranks]).tolist()) == list(range(n))
    assert [len(r.images) for r in ranks] == [21, 20]  # each holds its own shard only
    counts = torch.zeros(n)
    for r, batches in enumerate(ranks):
        torch.manual_seed(10 + r)  # each rank its own (secret) stream
        drawn = inclusion_counts(batches)
        assert set(drawn.nonzero().flatten().tolist()) <= set(batches.shard.tolist())
        counts += drawn
    assert 15 < chi_square(counts, steps, q) < 80  # chi-square(41): mean 41, sd 9


def test_building_the_batches_draws_nothing_and_a_restored_rng_redraws_the_same_batches():
    n = 30
    torch.manual_seed(5)
    state = torch.get_rng_state()
    batches = PoissonBatches(torch.zeros(n, 2), torch.arange(n), sample_rate=0.3, steps=4)
    assert torch.equal(torch.get_rng_state(), state)
    first = [y.tolist() for _, y in batches]
    torch.set_rng_state(state)
    assert [y.tolist() for _, y in batches] == first


def test_a_given_generator_is_the_only_source():
    n = 30
    batches = PoissonBatches(torch.zeros(n, 2), torch.arange(n), sample_rate=0.3, steps=4,
                             generator=torch.Generator().manual_seed(1))
    state = torch.get_rng_state()
    drawn = [y.tolist() for _, y in batches]
    assert torch.equal(torch.get_rng_state(), state)
    batches.generator = torch.Generator().manual_seed(1)
    assert [y.tolist() for _, y in batches] == drawn


# ---- precision ----------------------------------------------------------------------------------------
class ConvNet(nn.Module):
    """Strided, grouped and few-output-channel convolutions, GroupNorm and Linear: every bk
    Conv2d path, and what opacus' hooks and vmap see."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2), nn.SiLU(),
            nn.Conv2d(8, 2, 3, padding=1), nn.SiLU())
        self.head = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x, y):
        out = self.head(self.features(x.float() / 127.5 - 1.0).flatten(1))
        return out.pow(2).sum(1) - 2 * out.gather(1, y[:, None]).squeeze(1)  # ||out - onehot(y)||^2 - 1


def per_sample_loss(model, x, y):
    return model(x, y)


def data(n=6):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g), torch.randint(0, 3, (n,), generator=g)


def model():
    torch.manual_seed(0)
    return ConvNet()


def norms_of_grad_samples(net: nn.Module) -> torch.Tensor:
    grads = [p.grad_sample for p in net.parameters() if p.requires_grad]
    assert all(g.dtype == torch.float32 for g in grads)
    return torch.sqrt(sum(g.reshape(len(g), -1).pow(2).sum(1) for g in grads))


def norms(mode: str, precision: str) -> torch.Tensor:
    net, (x, y) = model(), data()
    loss = with_precision(per_sample_loss, torch.device("cpu"), precision)
    if mode == "bk":
        bk = BookKeepingClipping(net, loss, CLIP)
        bk.compute(x, y)
        assert bk.last_norms.dtype == torch.float32
        assert all(p.grad.dtype == torch.float32 for p in net.parameters())
        return bk.last_norms
    PerExampleGradients(net, loss, mode).compute(x, y)
    return norms_of_grad_samples(net)


@pytest.mark.parametrize("mode", ["bk", "vmap", "hooks"])
def test_bf16_per_example_norms_are_fp32_and_close_to_the_fp32_ones(mode):
    full, half = norms(mode, "fp32"), norms(mode, "bf16")
    assert half.dtype == torch.float32
    assert not torch.equal(full, half)  # autocast did take the forward to bf16
    torch.testing.assert_close(half, full, rtol=0.05, atol=1e-3)


def test_the_loss_runs_under_autocast_and_comes_back_fp32():
    seen = {}

    def probe(net, x, y):
        seen["dtype"] = net.head(torch.zeros(1, 32)).dtype
        return per_sample_loss(net, x, y)

    losses = with_precision(probe, torch.device("cpu"), "bf16")(model(), *data())
    assert seen["dtype"] == torch.bfloat16 and losses.dtype == torch.float32
    assert with_precision(per_sample_loss, torch.device("cpu"), "fp32") is per_sample_loss


@pytest.mark.parametrize("mode", ["bk", "vmap", "hooks"])
def test_a_bf16_dp_step_runs_and_keeps_fp32_weights(mode):
    net, (x, y) = model(), data(8)
    start = [p.detach().clone() for p in net.parameters()]
    torch.manual_seed(1)
    train_dp(net, x, y, per_sample_loss, plan=DPSGDPlan(dataset_size=8, batch_size=4, epochs=1), noise_multiplier=1.0,
             opts=FinetuneOptions(clip=CLIP, lr=0.05, grad_sample_mode=mode, precision="bf16", physical_batch_size=3,
                                  base_optimizer="sgd"))
    for p, s in zip(net.parameters(), start):
        assert p.dtype == torch.float32 and torch.isfinite(p).all() and not torch.equal(p, s)


def test_ghost_is_refused_under_bf16_and_precision_is_an_option_of_dp_sgd_methods_only():
    with pytest.raises(BadInput, match="grad_sample_mode=ghost cannot be used with precision=bf16"):
        check_combination(FinetuneOptions(grad_sample_mode="ghost", precision="bf16"))
    with pytest.raises(BadInput, match="precision"):
        train_dp(model(), *data(), per_sample_loss, plan=DPSGDPlan(6, 3, 1), noise_multiplier=1.0,
                 opts=FinetuneOptions(clip=CLIP, lr=0.1, precision="bf16", grad_sample_mode="ghost"))
    with pytest.raises(BadInput, match="precision"):
        resolve_options(get_method("dp-cvae"), FinetuneOptions(precision="fp16"))
    assert resolve_options(get_method("dpdm"), FinetuneOptions()).precision == "fp32"
    resolved = resolve_options(get_method("dpdm"), FinetuneOptions(precision="bf16"))
    assert resolved.record()["precision"] == "bf16"
    assert FinetuneOptions.from_record(resolved.record()).precision == "bf16"
    with pytest.raises(BadInput, match="has no `precision`"):
        resolve_options(get_method("dp-gan"), FinetuneOptions(precision="bf16"))


def test_the_cli_flags_precision_and_select_public_device():
    from dpsynth.cli.flags import command_flags
    from dpsynth.cli.app import app

    assert command_flags(app, ["finetune"])["precision"] == "--precision"
    assert command_flags(app, ["select-public"])["device"] == "--device"


# ---- channels_last -------------------------------------------------------------------------------------
def test_channels_last_only_for_convolutional_models_on_the_gpu():
    assert prefers_channels_last(ConvNet(), torch.device("cuda"))
    assert not prefers_channels_last(ConvNet(), torch.device("cpu"))
    assert not prefers_channels_last(nn.Linear(2, 2), torch.device("cuda"))


@pytest.mark.parametrize("strategy", ["ghost", "materialise"])
def test_bookkeeping_on_channels_last_equals_the_contiguous_result(strategy):
    x, y = data()
    results = []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        net = model().to(memory_format=memory_format)
        xs = x.contiguous(memory_format=memory_format)
        bk = BookKeepingClipping(net, per_sample_loss, CLIP, strategy=strategy)
        bk.compute(xs, y)
        grads = [p.grad.clone() for p in net.parameters()]
        each = per_example_gradients(net, per_sample_loss, xs, y, strategy=strategy)
        results.append((bk.last_norms, grads, each))
    (n0, g0, e0), (n1, g1, e1) = results
    assert model().to(memory_format=torch.channels_last).features[0].weight.is_contiguous(
        memory_format=torch.channels_last)  # the layout the second pass ran on
    torch.testing.assert_close(n1, n0, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for name in e0:
        torch.testing.assert_close(e1[name], e0[name], rtol=1e-5, atol=1e-6)


def test_the_batches_keep_channels_last_after_indexing():
    x = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8)
    batches = PoissonBatches(x, torch.arange(10), sample_rate=0.5, steps=3, memory_format=torch.channels_last)
    for xb, yb in batches:
        assert xb.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(xb, x[yb])


def test_vmap_per_example_gradients_on_channels_last_equal_the_contiguous_ones():
    x, y = data()
    grads = []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        net = model().to(memory_format=memory_format)
        PerExampleGradients(net, per_sample_loss, "vmap").compute(x.contiguous(memory_format=memory_format), y)
        grads.append([p.grad_sample for p in net.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode,nhwc", [("bk", True), ("vmap", True), ("ghost", False), ("hooks", False)])
def test_train_dp_in_channels_last_takes_the_contiguous_steps_and_returns_the_usual_layout(mode, nhwc, monkeypatch):
    """On a GPU (forced here), bk and vmap train in channels_last; opacus' hooks and ghost never
    do (their conv samplers assume NCHW strides)."""
    from dpsynth.training import dpsgd

    x, y = data(8)
    weights = []
    for forced in (False, True):
        monkeypatch.setattr(dpsgd, "prefers_channels_last", lambda model, device: forced)  # as on a GPU
        net, layouts = model(), set()

        def loss(m, xb, yb):
            layouts.add(net.features[0].weight.is_contiguous(memory_format=torch.channels_last))
            return per_sample_loss(m, xb, yb)

        torch.manual_seed(2)
        trained = train_dp(net, x, y, loss, plan=DPSGDPlan(dataset_size=8, batch_size=4, epochs=1),
                           noise_multiplier=0.5, opts=FinetuneOptions(clip=CLIP, lr=0.05, grad_sample_mode=mode,
                                                                      base_optimizer="sgd"))
        assert layouts == {forced and nhwc}
        assert all(p.is_contiguous() for p in trained.parameters())
        weights.append(torch.cat([p.detach().flatten() for p in trained.parameters()]))
    torch.testing.assert_close(weights[1], weights[0], rtol=1e-5, atol=1e-6)


def test_secure_noise_comes_from_the_given_generator_and_refuses_a_gpu(monkeypatch):
    import importlib.util

    from dpsynth.training import dpsgd
    from dpsynth.training.private_optimizer import make_private_optimizer

    base = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    csprng_like = torch.Generator().manual_seed(7)
    for kind, sums in (("dpsgd", False), ("dpsgd", True), ("efsgd", False)):
        opt = make_private_optimizer(kind, base, noise_multiplier=1.0, clip=1.0, expected_batch_size=4.0,
                                     feedback_clip=0.1 if kind == "efsgd" else None, clipped_sums=sums,
                                     generator=csprng_like)
        assert opt.generator is csprng_like  # opacus draws the noise from it, not from the global RNG
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "torchcsprng" else real_find_spec(name, *a))
    dpsgd.check_secure_available(True, torch.device("cpu"))
    with pytest.raises(BadInput, match="^`secure` draws sampling and noise from opacus' CSPRNG, a CPU generator"):
        dpsgd.check_secure_available(True, torch.device("cuda"))
