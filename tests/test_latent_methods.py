"""The DP-LDM family (dp-ldm, dp-ldm-sd, dp-lora): exactly the intended parameters are
trainable (counts computed here from the architecture, not from the model), per-sample
gradients of the trainable part against one-at-a-time autograd, LoRA's noise multiplicity
averaged inside each example before clipping, and each method through all five CLI stages
with the manifest's epsilon against prv-accountant's own mechanism."""

import numpy as np
import pytest
import torch
import yaml
from opacus import GradSampleModule
from prv_accountant import PoissonSubsampledGaussianMechanism, PRVAccountant
from typer.testing import CliRunner

from dpsynth.cli.app import app
from dpsynth.errors import BadInput
from dpsynth.methods import get_method
from dpsynth.training.dpsgd import PerExampleGradients
from dpsynth.training.options import FinetuneOptions, resolve_options

RES, CLASSES = 8, 3
# latent 4x4 (f = 2), U-Net levels at 4x4 (C = 8) and 2x2 (C = 16), attention at both.
LDM_ARCH = dict(ae_width=4, ae_ch_mult=(1, 2), ae_res_blocks=1, z_channels=2, width=8, ch_mult=(1, 2),
                num_res_blocks=1, attn_levels=(1, 2), head_channels=4, context_dim=6, timesteps=50)
EDM_ARCH = dict(width=4, ch_mult=(1, 2), num_res_blocks=1)
# Transformers in module order (down, middle, up): num_res_blocks per level down, one in the
# middle, num_res_blocks + 1 per level up.
TRANSFORMER_CHANNELS = [8, 16, 16, 16, 16, 8, 8]


def linear(n_in, n_out, bias=True):
    return n_in * n_out + (n_out if bias else 0)


def transformer_params(c: int, context: int) -> int:
    """SpatialTransformer (depth 1) as in the LDM code: GroupNorm, 1x1 conv in, LayerNorm x3,
    self-attention (q, k, v bias-free; out with bias), cross-attention to `context`, GEGLU
    feed-forward (c -> 2 * 4c, then 4c -> c), 1x1 conv out."""
    norms = 2 * c + 3 * 2 * c
    convs = 2 * linear(c, c)
    self_attn = 3 * linear(c, c, bias=False) + linear(c, c)
    cross_attn = linear(c, c, bias=False) + 2 * linear(context, c, bias=False) + linear(c, c)
    ff = linear(c, 8 * c) + linear(4 * c, c)
    return norms + convs + self_attn + cross_attn + ff


def lora_params(c: int, context: int, r: int) -> int:
    """LoRA A (r x in) and B (out x r) on q, k, v and out of both attentions of a transformer."""
    per_attention = lambda kv_in: r * (c + c) + 2 * r * (kv_in + c) + r * (c + c)  # noqa: E731
    return per_attention(c) + per_attention(context)


def class_embedder(context: int) -> int:
    return (CLASSES + 1) * context  # one row per class plus the null label


def prepared(name: str, train_opts: dict | None = None, **opts):
    method = get_method(name, LDM_ARCH if name != "dp-ldm-sd" else EDM_ARCH)
    torch.manual_seed(0)
    generator = method.build_generator(RES, 1, CLASSES)
    options = resolve_options(method, FinetuneOptions(train_opts=train_opts, **opts))
    return method, method.prepare_private(generator, options), options


def trainable(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def test_dp_ldm_trains_exactly_the_transformers_and_the_class_embedder():
    _, model, _ = prepared("dp-ldm")
    expected = sum(transformer_params(c, 6) for c in TRANSFORMER_CHANNELS) + class_embedder(6)
    assert sum(p.numel() for p in trainable(model).values()) == expected
    assert all(n.startswith("class_embed.") or ".transformer_blocks." in n or n.split(".")[-2] in
               ("norm", "proj_in", "proj_out") for n in trainable(model))
    assert not any(n.startswith("autoencoder.") for n in trainable(model))
    # DPImageBench's ablation_blocks: the first N transformers stay frozen.
    _, model, _ = prepared("dp-ldm", {"frozen_transformers": 3})
    expected = sum(transformer_params(c, 6) for c in TRANSFORMER_CHANNELS[3:]) + class_embedder(6)
    assert sum(p.numel() for p in trainable(model).values()) == expected
    with pytest.raises(BadInput, match="frozen_transformers=7"):
        prepared("dp-ldm", {"frozen_transformers": 7})


@pytest.mark.parametrize("rank", [8, 2])
def test_dp_lora_adapts_q_k_v_and_the_output_projection_only(rank):
    _, model, _ = prepared("dp-lora", {"lora_rank": rank, "lora_alpha": 4})
    names = trainable(model)
    expected = sum(lora_params(c, 6, rank) for c in TRANSFORMER_CHANNELS) + class_embedder(6)
    assert sum(p.numel() for p in names.values()) == expected
    attentions = 2 * len(TRANSFORMER_CHANNELS)
    for target in ("to_q", "to_k", "to_v", "to_out.0"):  # DPImageBench's "to_out.Linear" would match none
        assert sum(f".{target}.lora_A." in n for n in names) == attentions
    assert all(".lora_" in n or n.startswith("class_embed.") for n in names)
    assert model.cfg.lora_rank == rank and model.cfg.lora_alpha == 4.0  # the release rebuilds the adapters


def test_dp_ldm_sd_trains_attention_projections_and_embeddings_only():
    _, model, _ = prepared("dp-ldm-sd")
    w = EDM_ARCH["width"]
    c = w * 2  # attention at half resolution: the second level, 2w channels
    attentions = 1 + 1 + 2  # down (one block), middle, up (two blocks)
    expected = ((CLASSES + 1) * 4 * w + linear(w, 4 * w) + linear(4 * w, 4 * w)
                + attentions * (linear(c, 3 * c) + linear(c, c)))
    assert sum(p.numel() for p in trainable(model).values()) == expected
    assert not any(".norm." in n or "conv" in n for n in trainable(model))


def ready(name: str, train_opts: dict | None = None):
    """A prepared generator with random weights everywhere (not the zero-initialised start, so
    every trainable part has a gradient; LoRA's B too, so A has one)."""
    method = get_method(name, LDM_ARCH)
    torch.manual_seed(1)
    model = method.build_generator(RES, 1, CLASSES)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    model = method.prepare_private(model, resolve_options(method, FinetuneOptions(train_opts=train_opts)))
    for n, p in model.named_parameters():
        if ".lora_B." in n:
            torch.nn.init.normal_(p, std=0.2)
    return model


def fixed_draws(k: int, latent_shape=(2, 4, 4)):
    gen = torch.Generator().manual_seed(3)
    t = torch.randint(0, 50, (k,), generator=gen)
    return t, torch.randn(k, *latent_shape, generator=gen), torch.randn(k, *latent_shape, generator=gen)


def fixed_draw_loss(k: int):
    """Row r uses draw r mod k of (t, noise, posterior noise): deterministic, and one example's K
    rows see K different draws."""
    t, noise, post = fixed_draws(k)

    def loss(model, x, y):
        idx = torch.arange(len(x)) % k
        return model(x, y, t[idx], noise[idx], post[idx])

    return loss


def _one_at_a_time(model, loss, x, y, k):
    """Reference: for each example alone, the gradient of the mean of its K draws' losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in range(len(x)):
        xs, ys = x[i:i + 1].repeat_interleave(k, 0), y[i:i + 1].repeat_interleave(k, 0)
        out.append(torch.autograd.grad(loss(model, xs, ys).mean(), params))
    return params, out


def _check_against(grads, params, reference, n):
    for j, p in enumerate(params):
        assert p.grad_sample.shape == (n, *p.shape)  # one gradient per example, not per draw
        for i in range(n):
            torch.testing.assert_close(p.grad_sample[i], reference[i][j], rtol=1e-4, atol=1e-6)
    if isinstance(grads.module, GradSampleModule):
        grads.module._close()


@pytest.mark.parametrize("name,mode", [("dp-ldm", "hooks"), ("dp-lora", "vmap")])
def test_per_sample_gradients_of_the_trainable_part_match_one_at_a_time_autograd(name, mode):
    model = ready(name, {"lora_rank": 2} if name == "dp-lora" else None)
    x = torch.randint(0, 256, (3, 1, RES, RES), dtype=torch.uint8)
    y = torch.tensor([0, 2, 1])
    loss = fixed_draw_loss(1)
    params, reference = _one_at_a_time(model, loss, x, y, 1)
    grads = PerExampleGradients(model, loss, mode, multiplicity=1)
    grads.compute(x, y)
    for p in model.parameters():  # opacus computed and stored nothing for the frozen parameters
        if not p.requires_grad:
            assert getattr(p, "grad_sample", None) is None
    _check_against(grads, params, reference, len(x))


@pytest.mark.parametrize("mode", ["hooks", "vmap"])
def test_lora_noise_multiplicity_is_averaged_inside_each_example_before_clipping(mode):
    k = 3
    model = ready("dp-lora", {"lora_rank": 2})
    x = torch.randint(0, 256, (2, 1, RES, RES), dtype=torch.uint8)
    y = torch.tensor([1, 2])
    loss = fixed_draw_loss(k)
    params, reference = _one_at_a_time(model, loss, x, y, k)
    # The gradient of an example's K-mean loss is the mean of its K single-draw gradients, each alone...
    t, noise, post = fixed_draws(k)
    for i in range(len(x)):
        draws = [torch.autograd.grad(model(x[i:i + 1], y[i:i + 1], t[d:d + 1], noise[d:d + 1], post[d:d + 1]).sum(),
                                     params) for d in range(k)]
        for j in range(len(params)):
            torch.testing.assert_close(torch.stack([g[j] for g in draws]).mean(0), reference[i][j],
                                       rtol=1e-4, atol=1e-6)
    # ... and the trainer's per-example gradient (what opacus clips, once per example) is that mean.
    grads = PerExampleGradients(model, loss, mode, multiplicity=k)
    grads.compute(x, y)
    _check_against(grads, params, reference, len(x))


def _invoke(*args):
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _prv_epsilon(event: dict, delta: float) -> tuple[float, float]:
    mechanism = PoissonSubsampledGaussianMechanism(event["sample_rate"], event["noise_multiplier"])
    acc = PRVAccountant(prvs=[mechanism], max_self_compositions=[event["steps"]], eps_error=0.01,
                        delta_error=delta / 1000)
    _, estimate, upper = acc.compute_epsilon(delta, [event["steps"]])
    return estimate, upper


LDM_ARCH_FLAG = ("ae_width=4,ae_ch_mult=1:2,ae_res_blocks=1,z_channels=2,width=8,ch_mult=1:2,num_res_blocks=1,"
                 "attn_levels=1:2,head_channels=4,context_dim=6,timesteps=50")


@pytest.mark.parametrize("method", ["dp-ldm", "dp-ldm-sd", "dp-lora"])
def test_each_latent_method_runs_all_stages_through_the_cli(tmp_path, method):
    run = str(tmp_path / "run")
    common = ["--run", run, "--method", method, "--sensitive", "fashionmnist", "--limit", "300",
              "--public-size", "60000", "--resolution", "8"]
    arch = LDM_ARCH_FLAG if method != "dp-ldm-sd" else "width=4,ch_mult=1:2,num_res_blocks=1"
    out = _invoke("select-public", *common, "--public", "digits", "--sigma", "20", "--quiet")
    assert "skipped" in out
    extra = ["--train-opts", "ae_epochs=1,ae_batch_size=64"] if method != "dp-ldm-sd" else []
    _invoke("pretrain", *common, "--public", "digits", "--epochs", "1", "--batch-size", "64", "--arch", arch,
            *extra, "--quiet")
    k = ["-K", "2"] if method != "dp-ldm" else []
    _invoke("finetune", *common, "--eps", "8", "--epochs", "1", "--batch-size", "100", *k,
            "--physical-batch-size", "40", "--quiet")
    _invoke("generate", "--run", run, "--n", "120", "--steps", "3", "--quiet")
    _invoke("evaluate", "--run", run, "--epochs", "1", "--quiet")
    manifest = yaml.safe_load((tmp_path / "run" / "manifest.yaml").read_text())
    events = manifest["privacy"]["events"]
    assert [(e["stage"], e["mechanism"]) for e in events] == [("finetune", "poisson_gaussian")]
    estimate, upper = _prv_epsilon(events[0], manifest["privacy"]["delta"])
    assert estimate - 1e-6 <= manifest["privacy"]["epsilon"] <= upper + 0.02
    assert manifest["privacy"]["epsilon"] <= 8.0
    config = manifest["stages"]["finetune"]["config"]
    assert 0 < config["trainable_parameters"] < config["parameters"]
    synthetic = np.load(tmp_path / "run" / "synthetic.npz")
    assert synthetic["images"].shape == (120, 1, 8, 8)
