"""The diffusion family: backbone, per-example gradients with noise multiplicity, virtual
steps, DP-FETA's central images, and all four methods through the CLI."""

import math

import numpy as np
import pytest
import torch
import yaml
from prv_accountant import GaussianMechanism, PoissonSubsampledGaussianMechanism, PRVAccountant
from typer.testing import CliRunner

from dpsynth.mechanisms.central_images import l2_sensitivity, noisy_class_means, noisy_central_images
from dpsynth.cli.app import app
from dpsynth.errors import BadInput
from dpsynth.methods import METHODS, get_method, parse_arch
from dpsynth.models.edm import EDMConfig, EDMDiffusion
from dpsynth.training.dpsgd import DPSGDPlan, PerExampleGradients, train_dp
from dpsynth.training.options import FinetuneOptions

TINY = dict(resolution=8, channels=1, num_classes=3, width=4, ch_mult=(1, 2), num_res_blocks=1)


def fixed_draw_loss(k: int):
    """A deterministic stand-in for the random EDM loss: row r uses noise draw r mod k, so
    one example's K rows see K different (fixed) noise levels and noises."""
    gen = torch.Generator().manual_seed(7)
    noises = torch.randn(k, 1, 8, 8, generator=gen)
    sigmas = torch.exp(torch.randn(k, generator=gen))

    def loss(model, x, y):
        idx = torch.arange(len(x)) % k
        return model(x, y, sigmas[idx], noises[idx])

    return loss


@pytest.mark.parametrize("mode", ["hooks", "functorch", "vmap"])
def test_per_example_gradients_average_k_draws_like_one_at_a_time_reference(mode):
    torch.manual_seed(0)
    k, b = 3, 4
    model = EDMDiffusion(EDMConfig(**TINY))
    for p in model.parameters():  # leave the zero-initialised start, so every layer has a gradient
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randint(0, 256, (b, 1, 8, 8), dtype=torch.uint8)
    y = torch.tensor([0, 1, 2, 1])
    loss = fixed_draw_loss(k)
    reference = []
    for i in range(b):
        model.zero_grad()
        loss(model, x[i:i + 1].repeat_interleave(k, 0), y[i:i + 1].repeat_interleave(k, 0)).mean().backward()
        reference.append([p.grad.detach().clone() for p in model.parameters()])
    model.zero_grad()
    grads = PerExampleGradients(model, loss, mode, multiplicity=k)
    grads.compute(x, y)
    for j, p in enumerate(model.parameters()):
        assert p.grad_sample.shape == (b, *p.shape)
        for i in range(b):
            torch.testing.assert_close(p.grad_sample[i], reference[i][j], rtol=1e-4, atol=1e-6)


def test_virtual_steps_give_the_same_update_as_one_large_batch():
    """Splitting a logical batch into physical chunks must not change the mechanism:
    with no noise and the same Poisson batch, the parameters after training agree."""
    x = torch.randint(0, 256, (24, 1, 8, 8), dtype=torch.uint8)
    y = torch.randint(0, 3, (24,))
    results = []
    for physical in (None, 5):
        torch.manual_seed(3)
        model = EDMDiffusion(EDMConfig(**TINY))
        torch.manual_seed(11)  # same Poisson batches in both runs
        plan = DPSGDPlan(dataset_size=24, batch_size=12, epochs=1)
        train_dp(model, x, y, fixed_draw_loss(2), plan=plan, noise_multiplier=0.0,
                 opts=FinetuneOptions(clip=0.5, lr=1e-2, grad_sample_mode="vmap", noise_multiplicity=2,
                                      physical_batch_size=physical))
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.equal(results[0], torch.cat([p.detach().flatten() for p in
                                                  EDMDiffusion(EDMConfig(**TINY)).parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-6)


def test_ghost_clipping_refuses_noise_multiplicity():
    model = EDMDiffusion(EDMConfig(**TINY))
    x, y = torch.zeros(8, 1, 8, 8, dtype=torch.uint8), torch.zeros(8, dtype=torch.long)
    with pytest.raises(BadInput, match="ghost"):
        train_dp(model, x, y, fixed_draw_loss(2), plan=DPSGDPlan(8, 4, 1), noise_multiplier=1.0,
                 opts=FinetuneOptions(clip=1.0, lr=1e-3, grad_sample_mode="ghost", noise_multiplicity=2))


def test_backbone_shapes_loss_and_sampler():
    model = EDMDiffusion(EDMConfig(**TINY))
    x = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    losses = model(x, torch.tensor([0, 1, 2, 0, 1]))
    assert losses.shape == (5,) and torch.isfinite(losses).all() and (losses > 0).all()
    images = model.sample(torch.tensor([0, 1, 2]), generator=torch.Generator().manual_seed(0), steps=3)
    assert images.shape == (3, 1, 8, 8) and images.dtype == torch.uint8
    levels = model.noise_levels(5, torch.device("cpu"))
    assert levels[0] == pytest.approx(80.0) and levels[-2] == pytest.approx(0.002) and levels[-1] == 0


def test_default_backbone_has_about_1_8m_parameters_and_no_batchnorm():
    model = EDMDiffusion(EDMConfig(resolution=32, channels=3))
    assert 1.7e6 < sum(p.numel() for p in model.parameters()) < 1.9e6
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_arch_parsing_and_refusal_of_unknown_keys():
    assert parse_arch("width=8,ch_mult=1:2,dropout=0.1") == {"width": 8, "ch_mult": [1, 2], "dropout": 0.1}
    assert parse_arch('{"width": 8}') == {"width": 8}
    with pytest.raises(BadInput, match="depth"):
        get_method("dpdm", {"depth": 3})
    with pytest.raises(BadInput, match="resolution"):
        get_method("dpdm", {"resolution": 64})  # set by the data, never by --arch
    assert {"dpdm", "pdp-diffusion", "privimage", "dp-feta"} <= set(METHODS)


def test_central_images_sensitivity_is_delta_for_neighbouring_datasets():
    """Adding one image changes the vector of per-class sums by at most Delta (L2)."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8)
    labels = torch.randint(0, 3, (40,))
    worst = torch.full((1, 1, 8, 8), 255, dtype=torch.uint8)  # the largest possible contribution
    delta = l2_sensitivity(1, 8, 8)

    def sums(imgs, labs):
        x = torch.nn.functional.interpolate(imgs.float() / 255.0, scale_factor=0.5, mode="nearest")
        out = torch.zeros(3, 1, 4, 4)
        return out.index_add_(0, labs, x)

    diff = sums(torch.cat([images, worst]), torch.cat([labels, torch.tensor([1])])) - sums(images, labels)
    assert float(diff.norm()) == pytest.approx(delta)


def test_central_images_noise_has_the_stated_scale():
    """On an all-zero dataset sampled at rate 1, each noisy mean is N(0, (sigma*Delta/m)^2)
    with m = N/classes the public expected class count."""
    images = torch.zeros(300, 1, 8, 8, dtype=torch.uint8)
    rows = torch.arange(300) % 3
    sigma, gen = 2.0, torch.Generator().manual_seed(0)
    draws = torch.stack([noisy_class_means(images, rows, 3, noise_multiplier=sigma, sample_rate=1.0, generator=gen)
                         for _ in range(300)])
    expected_std = sigma * l2_sensitivity(1, 8, 8) / 100.0
    assert float(draws.mean()) == pytest.approx(0.0, abs=3 * expected_std / math.sqrt(draws.numel()))
    assert float(draws.std()) == pytest.approx(expected_std, rel=0.05)
    out, out_labels = noisy_central_images(images, rows, 3, noise_multiplier=sigma, sample_rate=1.0, queries=2,
                                           generator=gen)
    assert out.shape == (6, 1, 8, 8) and out.dtype == torch.uint8 and out_labels.tolist() == [0, 1, 2, 0, 1, 2]
    with pytest.raises(BadInput):
        noisy_central_images(images, rows, 3, noise_multiplier=0.0, sample_rate=1.0, queries=1)


def _invoke(*args):
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _independent_epsilon(events: list[dict], delta: float) -> tuple[float, float]:
    prvs, steps = [], []
    for e in events:
        if e["mechanism"] == "gaussian":
            prvs.append(GaussianMechanism(e["noise_multiplier"]))
        else:
            prvs.append(PoissonSubsampledGaussianMechanism(e["sample_rate"], e["noise_multiplier"]))
        steps.append(int(e.get("steps", 1)))
    acc = PRVAccountant(prvs=prvs, max_self_compositions=steps, eps_error=0.01, delta_error=delta / 1000)
    _, estimate, upper = acc.compute_epsilon(delta, steps)
    return estimate, upper


@pytest.mark.parametrize("method", ["dpdm", "pdp-diffusion", "privimage", "dp-feta"])
def test_every_diffusion_method_runs_all_stages_through_the_cli(tmp_path, method):
    run = str(tmp_path / "run")
    common = ["--run", run, "--method", method, "--sensitive", "fashionmnist", "--limit", "300", "--public-size", "60000", "--resolution", "8"]
    arch = "width=4,ch_mult=1:2,num_res_blocks=1"
    out = _invoke("select-public", *common, "--public", "digits", "--sigma", "20", "--quiet")
    assert ("skipped" in out) == (method != "privimage")
    out = _invoke("pretrain", *common, "--public", "digits", "--epochs", "1", "--batch-size", "64", "--arch", arch,
                  "--central-batch", "100", "--quiet")
    assert ("skipped" in out) == (method == "dpdm")
    finetune_arch = ["--arch", arch] if method == "dpdm" else []
    _invoke("finetune", *common, "--eps", "8", "--epochs", "1", "--batch-size", "100", "-K", "2",
            "--physical-batch-size", "40", *finetune_arch, "--quiet")
    _invoke("generate", "--run", run, "--n", "120", "--steps", "2", "--quiet")
    _invoke("evaluate", "--run", run, "--epochs", "1", "--quiet")
    manifest = yaml.safe_load((tmp_path / "run" / "manifest.yaml").read_text())
    events = manifest["privacy"]["events"]
    expected = {"dpdm": ["finetune"], "pdp-diffusion": ["finetune"], "privimage": ["select-public", "finetune"],
                "dp-feta": ["pretrain", "finetune"]}[method]
    assert [e["stage"] for e in events] == expected
    estimate, upper = _independent_epsilon(events, manifest["privacy"]["delta"])
    reported = manifest["privacy"]["epsilon"]
    assert estimate - 1e-6 <= reported <= upper + 0.02
    assert reported <= 8.0
    synthetic = np.load(tmp_path / "run" / "synthetic.npz")
    assert synthetic["images"].shape == (120, 1, 8, 8)
    assert manifest["stages"]["generate"]["config"]["weights"] == "ema"


def test_attention_sampling_path_matches_the_training_path():
    """Sampling (no grad) uses torch's fused attention; training writes the weights out.
    Both must compute the same network."""
    from dpsynth.models.unet import SelfAttention
    torch.manual_seed(0)
    attn = SelfAttention(8)
    for p in attn.parameters():  # the zero-initialised projection would hide the attention
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(5, 8, 6, 6)
    with torch.no_grad():
        fused = attn(x)
    explicit = attn(x)
    assert explicit.requires_grad and not fused.requires_grad
    torch.testing.assert_close(fused, explicit.detach(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(fused, x / math.sqrt(2.0), atol=1e-3)  # the attention term is not zero
