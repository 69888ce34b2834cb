"""The mean-embedding family (dp-merf, dp-ntk, dp-kernel): feature-norm and sensitivity bounds,
the noise scale of the release, the accounting of the planned events (against direct
prv-accountant calls), dp-ntk embedding every image, and all three methods through the CLI."""

import math

import numpy as np
import pytest
import torch
import yaml
from prv_accountant import GaussianMechanism, PoissonSubsampledGaussianMechanism, PRVAccountant
from typer.testing import CliRunner

from dpsynth.cli.app import app
from dpsynth.cli.main import main
from dpsynth.errors import BadInput
from dpsynth.methods.mean_embedding import methods as me_methods
from dpsynth.methods.mean_embedding.features import NTKFeatures, RandomFourierFeatures
from dpsynth.methods.mean_embedding.generator import EmbeddingGenerator, EmbeddingGeneratorConfig
from dpsynth.mechanisms.embedding_release import exact_sum, noisy_sum, weights
from dpsynth.methods import PrivatePlan, get_method
from dpsynth.privacy.accountant import compose_epsilon, default_delta
from dpsynth.privacy.events import GaussianEvent, PoissonGaussianEvent
from dpsynth.training.options import FinetuneOptions, resolve_options

DIM = 64  # 1 x 8 x 8 images


def feature_maps():
    gen = torch.Generator().manual_seed(0)
    return {"rff": RandomFourierFeatures(DIM, 64, 3.0, generator=gen),
            "multi-rff": RandomFourierFeatures(DIM, 32, [0.1, 1.0, 4.0], generator=gen),
            "ntk": NTKFeatures(DIM, 8, 16, generator=gen)}


def adversarial_images():
    gen = torch.Generator().manual_seed(1)
    return torch.cat([torch.zeros(1, 1, 8, 8, dtype=torch.uint8), torch.full((1, 1, 8, 8), 255, dtype=torch.uint8),
                      torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8, generator=gen),
                      (torch.arange(64).reshape(1, 1, 8, 8) % 2 * 255).to(torch.uint8)])  # checkerboard-ish


@pytest.mark.parametrize("name", ["rff", "multi-rff", "ntk"])
@pytest.mark.parametrize("count_weight", [0.1, 0.9])
def test_neighbouring_datasets_move_the_embedding_sum_by_at_most_one(name, count_weight):
    fmap = feature_maps()[name]
    gen = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (30, 1, 8, 8), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 3, (30,), generator=gen)
    base = exact_sum(fmap, images, labels, 3, count_weight=count_weight, chunk=7)
    worst = 0.0
    for x in adversarial_images():
        phi = fmap(x.reshape(1, -1).float() / 255.0)
        assert float(phi.double().norm()) <= 1.0 + 1e-6  # float32 rounding; the release's margin absorbs it
        for y in range(3):
            grown = exact_sum(fmap, torch.cat([images, x[None]]), torch.cat([labels, torch.tensor([y])]), 3,
                              count_weight=count_weight, chunk=7)
            worst = max(worst, float((grown - base).norm()))
    assert worst <= 1.0
    assert worst > 0.999  # the bound is tight: phi has norm exactly 1 and a^2 + b^2 ~ 1


def test_rff_kernel_approximates_the_rbf_mixture():
    gen = torch.Generator().manual_seed(3)
    fmap = RandomFourierFeatures(DIM, 20000, [1.0, 4.0], generator=gen)
    x = torch.rand(4, DIM, generator=gen)
    approx = (fmap(x) @ fmap(x).t()).double()
    sq = torch.cdist(x.double(), x.double()) ** 2
    exact = (torch.exp(-sq / 2) + torch.exp(-sq / 32)) / 2
    torch.testing.assert_close(approx, exact, atol=0.03, rtol=0)


def test_ntk_features_equal_torch_func_per_example_gradients():
    fmap = feature_maps()["ntk"]
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(5, DIM, generator=gen)
    x[0] = 0.0  # an all-black image: only bias paths carry gradient
    params = fmap.parameters()
    grads = torch.func.vmap(torch.func.grad(fmap.output), in_dims=(None, 0))(params, x)
    flat = torch.cat([g.reshape(len(x), -1) for g in grads], dim=1)
    reference = flat / flat.norm(dim=1, keepdim=True)
    torch.testing.assert_close(fmap(x), reference, rtol=1e-4, atol=1e-6)
    w = torch.rand(5, 3, generator=gen)
    torch.testing.assert_close(fmap.class_sums(x, w), w.t() @ reference, rtol=1e-4, atol=1e-5)
    # and the generator's gradient flows through class_sums like through the materialised map
    xg = x.clone().requires_grad_(True)
    g1, = torch.autograd.grad(fmap.class_sums(xg, w).square().sum(), xg)
    g2, = torch.autograd.grad((w.t() @ fmap(xg)).square().sum(), xg)
    torch.testing.assert_close(g1, g2, rtol=1e-3, atol=1e-5)


def test_release_noise_has_the_stated_std():
    """An empty set releases pure noise: every coordinate of the raw sum is N(0, sigma^2)."""
    fmap = RandomFourierFeatures(DIM, 2000, 3.0)
    alpha, beta = weights(0.1)
    sigma, k = 2.5, 3
    draws_f, draws_c = [], []
    empty_x, empty_y = torch.zeros(0, 1, 8, 8, dtype=torch.uint8), torch.zeros(0, dtype=torch.long)
    for _ in range(4):
        out = noisy_sum(fmap, empty_x, empty_y, k, noise_multiplier=sigma, count_weight=0.1)
        draws_f.append(out.features.double().flatten() * alpha)
        draws_c.append(out.counts.double() * beta)
    raw = torch.cat(draws_f + draws_c)
    assert raw.numel() > 20000
    assert float(raw.mean()) == pytest.approx(0.0, abs=4 * sigma / math.sqrt(raw.numel()))
    assert float(raw.std()) == pytest.approx(sigma, rel=0.03)
    # with data, the release minus the exact sum is the same noise
    images = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8)
    labels = torch.randint(0, k, (40,))
    exact = exact_sum(fmap, images, labels, k, count_weight=0.1)
    out = noisy_sum(fmap, images, labels, k, noise_multiplier=sigma, count_weight=0.1)
    released = torch.cat([out.features.double().flatten() * alpha, out.counts.double() * beta])
    assert float((released - exact).std()) == pytest.approx(sigma, rel=0.05)


def _prv_upper(prvs, steps, delta):
    acc = PRVAccountant(prvs=prvs, max_self_compositions=steps, eps_error=0.01, delta_error=delta / 1000)
    return acc.compute_epsilon(delta, steps)


# dp-kernel's case is the CLI test's finetune (N = 300, q = 1/3, T = 3, eps 3): one calibration
# (cached within the process) serves both, which keeps this file fast.
PLAN_CASES = [("dp-merf", 60000, {}, 1.0, 1e-5, True), ("dp-ntk", 60000, {}, 10.0, 1e-5, True),
              ("dp-kernel", 300, {"epochs": 1, "batch_size": 100}, 3.0, default_delta(300), False)]


@pytest.mark.parametrize("method,n,given,eps,delta,with_spent", PLAN_CASES, ids=[c[0] for c in PLAN_CASES])
def test_planned_events_match_a_direct_prv_computation(method, n, given, eps, delta, with_spent):
    m = get_method(method)
    spent = [GaussianEvent(stage="pretrain", noise_multiplier=20.0)] if with_spent else []
    plan = m.plan_private(dataset_size=n, opts=resolve_options(m, FinetuneOptions(**given)), spent=spent, eps=eps, delta=delta)
    (event,) = plan.events
    sigma = event.noise_multiplier
    prvs, steps = ([GaussianMechanism(20.0)], [1]) if with_spent else ([], [])
    if method == "dp-kernel":
        assert isinstance(event, PoissonGaussianEvent)
        assert event.sample_rate == pytest.approx(100 / 300) and event.steps == 3
        prvs, steps = prvs + [PoissonSubsampledGaussianMechanism(event.sample_rate, sigma)], steps + [3]
    else:
        assert isinstance(event, GaussianEvent) and event.steps == 1
        prvs, steps = prvs + [GaussianMechanism(sigma)], steps + [1]
    _, estimate, upper = _prv_upper(prvs, steps, delta)
    assert upper <= eps
    assert compose_epsilon([*spent, *plan.events], delta).upper == pytest.approx(upper, abs=0.02)
    assert estimate > 0.9 * eps  # calibrated, not padded: a little more noise would waste budget
    assert plan.settings["noise_multiplier"] == sigma


def test_bad_train_opts_are_refused_before_anything_runs():
    m = get_method("dp-merf")
    for bad in ("features=7", "bandwidth=0", "count_weight=1", "lr_decay=2"):
        with pytest.raises(BadInput):
            m.plan_private(dataset_size=100, opts=resolve_options(m, FinetuneOptions(**{"train_opts": bad})), spent=[], eps=1, delta=1e-5)
    with pytest.raises(BadInput, match="not a setting"):
        resolve_options(m, FinetuneOptions(**{"train_opts": "ntk_width=3"}))
    k = get_method("dp-kernel")
    with pytest.raises(BadInput, match="batch_size=101"):
        k.plan_private(dataset_size=100, opts=resolve_options(k, FinetuneOptions(**{"batch_size": 101})), spent=[], eps=1, delta=1e-5)


def test_dp_ntk_embeds_every_sensitive_image(monkeypatch):
    """DPImageBench's DP-NTK embeds only its first batch; ours must read all N rows once."""
    n, k = 2300, 3  # more than two chunks of 1000
    gen = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, k, (n,), generator=gen)
    rows, releases = [], []
    original_sums, original_noisy = NTKFeatures.class_sums, me_methods.noisy_sum

    def counting_sums(self, x, w):
        if not torch.is_grad_enabled():  # the sensitive side; the generator's loss needs gradients
            rows.append(len(x))
        return original_sums(self, x, w)

    def recording_noisy_sum(*args, **kwargs):
        releases.append(original_noisy(*args, **kwargs))
        return releases[-1]

    monkeypatch.setattr(NTKFeatures, "class_sums", counting_sums)
    monkeypatch.setattr(me_methods, "noisy_sum", recording_noisy_sum)
    m = get_method("dp-ntk")
    opts = resolve_options(m, FinetuneOptions(**{"epochs": 1, "batch_size": 1150, "train_opts": "ntk_width=4,ntk_width2=4"}))
    plan = PrivatePlan(events=(), settings={"noise_multiplier": 1e-6, "dataset_size": n})
    generator = m.build_generator(8, 1, k)
    m.train_private(generator, images, labels, opts=opts, plan=plan, device=torch.device("cpu"),
                    progress=lambda *a: None, checkpoints=None)
    assert sum(rows) == n and len(releases) == 1
    true_counts = torch.bincount(labels, minlength=k).float()
    torch.testing.assert_close(releases[0].counts, true_counts, atol=1e-3, rtol=0)


def test_dp_kernel_releases_exactly_the_planned_number_of_poisson_batches(monkeypatch):
    n, k = 40, 2
    images = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8)
    labels = torch.arange(n) % k
    sizes = []
    original = me_methods.noisy_sum

    def recording(fmap, batch_images, *args, **kwargs):
        sizes.append(len(batch_images))
        return original(fmap, batch_images, *args, **kwargs)

    monkeypatch.setattr(me_methods, "noisy_sum", recording)
    m = get_method("dp-kernel", {"width": 4, "hidden": 8})
    opts = resolve_options(m, FinetuneOptions(**{"epochs": 1, "batch_size": 1, "train_opts": "features=8,generator_batch=4"}))
    event = PoissonGaussianEvent(stage="finetune", noise_multiplier=1.0, sample_rate=1 / n, steps=n)
    plan = PrivatePlan(events=(event,), settings={"noise_multiplier": 1.0, "sample_rate": 1 / n, "releases": n,
                                                   "dataset_size": n})
    m.train_private(m.build_generator(8, 1, k), images, labels, opts=opts, plan=plan, device=torch.device("cpu"),
                    progress=lambda *a: None, checkpoints=None)
    assert len(sizes) == plan.events[0].steps == 40
    assert 0 in sizes  # rate 1/40: empty batches happen, and they are released (noise only)


def test_generator_samples_uint8_and_rebuilds_from_its_config():
    cfg = EmbeddingGeneratorConfig(resolution=8, channels=3, num_classes=2, latent_dim=4, hidden=8, width=4)
    model = EmbeddingGenerator(cfg)
    images = model.sample(torch.tensor([0, 1, 1]), generator=torch.Generator().manual_seed(0))
    assert images.shape == (3, 3, 8, 8) and images.dtype == torch.uint8
    rebuilt = get_method("dp-merf").generator_from_config(model.cfg.to_dict())
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt.sample(torch.tensor([0, 1, 1]), generator=torch.Generator().manual_seed(0)), images)
    assert not any(isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) for mod in model.modules())


def _invoke(*args):
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


TINY_OPTS = {"dp-merf": "features=64", "dp-ntk": "ntk_width=4,ntk_width2=8", "dp-kernel": "features=16"}


@pytest.mark.parametrize("method", ["dp-merf", "dp-ntk", "dp-kernel"])
def test_every_mean_embedding_method_runs_all_stages_through_the_cli(tmp_path, method):
    run = str(tmp_path / "run")
    common = ["--run", run, "--method", method, "--sensitive", "fashionmnist", "--limit", "300", "--public-size", "60000",
              "--resolution", "8"]  # declared N = 300 exactly
    assert "skipped" in _invoke("select-public", *common, "--quiet")
    assert "skipped" in _invoke("pretrain", *common, "--quiet")
    _invoke("finetune", *common, "--eps", "3", "--epochs", "1", "--batch-size", "100", "--lr", "0.01",
            "--train-opts", TINY_OPTS[method], "--arch", "width=4,hidden=16,latent_dim=8", "--quiet")
    _invoke("generate", "--run", run, "--n", "120", "--quiet")
    _invoke("evaluate", "--run", run, "--epochs", "1", "--quiet")
    manifest = yaml.safe_load((tmp_path / "run" / "manifest.yaml").read_text())
    (event,) = manifest["privacy"]["events"]
    delta = manifest["privacy"]["delta"]
    assert event["stage"] == "finetune"
    if method == "dp-kernel":
        assert event["mechanism"] == "poisson_gaussian" and event["steps"] == 3
        assert event["sample_rate"] == pytest.approx(100 / 300)
        prv = PoissonSubsampledGaussianMechanism(event["sample_rate"], event["noise_multiplier"])
    else:
        assert event["mechanism"] == "gaussian" and event["steps"] == 1
        prv = GaussianMechanism(event["noise_multiplier"])
    _, estimate, upper = _prv_upper([prv], [event["steps"]], delta)
    reported = manifest["privacy"]["epsilon"]
    assert estimate - 1e-6 <= reported <= upper + 0.02 and reported <= 3.0
    config = manifest["stages"]["finetune"]["config"]
    assert config["noise_multiplier"] == event["noise_multiplier"] and config["l2_sensitivity"] == 1.0
    synthetic = np.load(tmp_path / "run" / "synthetic.npz")
    assert synthetic["images"].shape == (120, 1, 8, 8) and synthetic["images"].dtype == np.uint8


@pytest.mark.parametrize("flag", [["--noise-multiplicity", "2"], ["--clip", "1.0"], ["--grad-sample-mode", "vmap"],
                                  ["--ema", "0.9"]])
def test_dp_sgd_only_flags_are_refused_and_nothing_is_written(tmp_path, capsys, flag):
    run = tmp_path / "run"
    code = main(["finetune", "--run", str(run), "--method", "dp-merf", "--sensitive", "fashionmnist", "--limit", "300", "--public-size", "60000",
                 "--resolution", "8", "--eps", "1", *flag])
    err = capsys.readouterr().err
    assert code == 2, err
    assert flag[0] in err and err.count("\n") == 1
    assert not run.exists() and list(tmp_path.iterdir()) == []
