"""The GAN family: per-sample gradients of the private discriminator, GS-WGAN's sanitizer
and accounting, planned events against prv-accountant, and each method through the CLI."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from prv_accountant import GaussianMechanism, PoissonSubsampledGaussianMechanism, PRVAccountant
from typer.testing import CliRunner

from dpsynth.cli.app import app
from dpsynth.methods.gan.dp_gan import (DPGANSchedule, PrivateDiscriminator, clipped_sum_of_grad_samples, fake_loss,
                                real_loss, train_dp_gan)
from dpsynth.methods.gan.gs_wgan import applied_noise_multiplier, assign_shards, sanitize, sanitized_generator_step
from dpsynth.methods.gan.models import ConditionalDiscriminator, ConditionalGenerator, GANConfig
from dpsynth.methods import get_method
from dpsynth.training.dpsgd import PerExampleGradients
from shard_closed_form import shard_gaussian_epsilon
from dpsynth.training.options import FinetuneOptions, resolve_options

TINY = GANConfig(resolution=8, channels=1, num_classes=3, latent_dim=4, width=4, disc_width=4)


def _disc(reconstruction: bool = False) -> PrivateDiscriminator:
    torch.manual_seed(0)
    cfg = GANConfig(**{**TINY.to_dict(), "reconstruction": reconstruction})
    return PrivateDiscriminator(ConditionalDiscriminator(cfg))


def _reference(model, loss, x, y) -> list[list[torch.Tensor]]:
    """One example at a time with plain autograd."""
    out = []
    for i in range(len(x)):
        model.zero_grad()
        loss(model, x[i:i + 1], y[i:i + 1]).sum().backward()
        out.append([p.grad.detach().clone() for p in model.parameters()])
    model.zero_grad()
    return out


@pytest.mark.parametrize("mode,recon", [("vmap", 0.0), ("vmap", 1.0), ("hooks", 1.0)])
def test_private_per_sample_gradients_are_the_real_rows_alone(mode, recon):
    disc = _disc(reconstruction=recon > 0)
    x = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    y = torch.tensor([0, 1, 2, 1, 0])
    reference = _reference(disc, real_loss(recon), x, y)
    # the fake term is computed first, as in training; it must not leave anything behind
    PerExampleGradients(disc, fake_loss, "vmap").compute(torch.rand(7, 1, 8, 8) * 2 - 1, torch.randint(0, 3, (7,)))
    for p in disc.parameters():
        p.grad_sample = None
    PerExampleGradients(disc, real_loss(recon), mode).compute(x, y)
    for j, p in enumerate(disc.parameters()):
        assert p.grad_sample.shape == (5, *p.shape)
        for i in range(5):
            torch.testing.assert_close(p.grad_sample[i], reference[i][j], rtol=1e-4, atol=1e-5)


def test_naive_opacus_two_forwards_one_backward_mixes_fake_rows_into_real_ones():
    """The bug dp_gan avoids: with opacus hooks, a real forward and a fake forward before
    one backward give 'per-sample' gradients that are real row i PLUS fake row i."""
    disc = _disc()
    xr, yr = torch.rand(4, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 0])
    xf, yf = torch.rand(4, 1, 8, 8) * 2 - 1, torch.tensor([2, 2, 1, 0])
    real_ref = _reference(disc, lambda m, a, b: F.softplus(-m(a, b)), xr, yr)
    fake_ref = _reference(disc, fake_loss, xf, yf)
    naive = GradSampleModule(disc, batch_first=True, loss_reduction="sum")
    (F.softplus(-naive(xr, yr)).sum() + F.softplus(naive(xf, yf)).sum()).backward()
    first = list(disc.parameters())[0].grad_sample[0]
    assert not torch.allclose(first, real_ref[0][0], atol=1e-6)
    torch.testing.assert_close(first, real_ref[0][0] + fake_ref[0][0], rtol=1e-4, atol=1e-6)
    naive._close()


def test_clipped_sum_clips_each_row_over_all_parameters():
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    rows = torch.randn(6, 7) * 5
    params[0].grad_sample, params[1].grad_sample = rows[:, :3], rows[:, 3:].reshape(6, 2, 2)
    summed = clipped_sum_of_grad_samples(params, 1.5)
    expected = sum(r * min(1.0, 1.5 / float(r.norm())) for r in rows)
    torch.testing.assert_close(torch.cat([summed[0], summed[1].flatten()]), expected, rtol=1e-4, atol=1e-5)


def test_dp_gan_runs_exactly_the_planned_noisy_steps(monkeypatch):
    calls = []
    original = DPOptimizer.add_noise

    def counting(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(DPOptimizer, "add_noise", counting)  # counts; the real noise still runs
    torch.manual_seed(1)
    x, y = torch.randint(0, 256, (60, 1, 8, 8), dtype=torch.uint8), torch.randint(0, 3, (60,))
    schedule = DPGANSchedule(dataset_size=60, batch_size=10, epochs=2, n_critic=3)
    generator = ConditionalGenerator(TINY)
    before = [p.detach().clone() for p in generator.parameters()]
    opts = FinetuneOptions(clip=1.0, lr=1e-3, train_opts={"g_lr": 1e-3, "beta1": 0.5, "recon_weight": 1.0})
    _, counts = train_dp_gan(generator, x, y, schedule=schedule, noise_multiplier=1.0, opts=opts)
    assert len(calls) == schedule.discriminator_steps == 12 and counts["discriminator_steps"] == 12
    assert counts["generator_steps"] == 4 == schedule.generator_steps
    assert any(not torch.equal(a, b) for a, b in zip(before, generator.parameters()))


def test_dp_gan_with_efsgd_steps_through_its_error_feedback():
    from dpsynth.training.efsgd import EFSGDOptimizer

    seen = []
    original = EFSGDOptimizer.add_noise

    def counting(self):
        seen.append(self)
        return original(self)

    torch.manual_seed(2)
    x, y = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8), torch.randint(0, 3, (40,))
    schedule = DPGANSchedule(dataset_size=40, batch_size=10, epochs=1, n_critic=2)
    try:
        EFSGDOptimizer.add_noise = counting
        opts = FinetuneOptions(clip=0.01, lr=1e-3, private_optimizer="efsgd", feedback_clip=0.005,
                               train_opts={"g_lr": 1e-3, "beta1": 0.5, "recon_weight": 1.0})
        train_dp_gan(ConditionalGenerator(TINY), x, y, schedule=schedule, noise_multiplier=1.0, opts=opts)
    finally:
        EFSGDOptimizer.add_noise = original
    assert len(seen) == 4
    errors = seen[-1].error_state()  # committed by EFSGD's step(): clipping at 0.01 leaves an error
    assert sum(float(e.abs().sum()) for e in errors) > 0


def test_gs_wgan_sanitizer_clips_to_c_and_adds_noise_of_the_stated_std():
    grads = torch.randn(32, 1, 8, 8) * torch.logspace(-2, 2, 32).view(32, 1, 1, 1)
    clip, sigma = 0.7, 3.0
    noisy, clipped = sanitize(grads, clip, sigma)
    norms = clipped.flatten(1).norm(dim=1)
    assert float(norms.max()) <= clip * (1 + 1e-5)
    small = grads.flatten(1).norm(dim=1) < clip
    torch.testing.assert_close(clipped[small], grads[small])  # rows below C are unchanged
    noise = (noisy - clipped).flatten()
    assert float(noise.std()) == pytest.approx(sigma * clip, rel=0.05)
    assert float(noise.mean()) == pytest.approx(0.0, abs=4 * sigma * clip / math.sqrt(noise.numel()))


def test_gs_wgan_generator_receives_only_the_sanitized_gradient():
    torch.manual_seed(0)
    generator, disc = ConditionalGenerator(TINY), ConditionalDiscriminator(TINY)
    optimizer = torch.optim.SGD(generator.parameters(), lr=0.0)
    noisy = sanitized_generator_step(generator, disc, optimizer, 16, 1.0, 2.0, torch.device("cpu"))
    assert noisy.shape == (16, 1, 8, 8)
    assert all(p.grad is None for p in disc.parameters())


def _mechanism(e):
    if e["mechanism"] == "gaussian":
        return GaussianMechanism(e["noise_multiplier"])
    return PoissonSubsampledGaussianMechanism(e["sample_rate"], e["noise_multiplier"])


def _prv_upper(events, delta):
    events = [e.to_dict() if hasattr(e, "to_dict") else e for e in events]
    prvs = [_mechanism(e) for e in events]
    steps = [int(e["steps"]) for e in events]
    acc = PRVAccountant(prvs=prvs, max_self_compositions=steps, eps_error=0.01, delta_error=delta / 1000)
    return acc.compute_epsilon(delta, steps)


def test_gs_wgan_event_multiplier_shards_and_steps():
    method = get_method("gs-wgan")
    opts = resolve_options(method, FinetuneOptions(batch_size=16, train_opts="discriminators=20,iterations=300"))
    plan = method.plan_private(dataset_size=400, opts=opts, spent=[], eps=5.0, delta=1e-5)
    (event,) = plan.events
    applied = plan.settings["noise_multiplier_applied"]
    assert event.mechanism == "shard_gaussian" and event.shards == 20 and event.steps == 300
    assert event.noise_multiplier == pytest.approx(applied / (2 * math.sqrt(16)))
    assert applied == pytest.approx(applied_noise_multiplier(event.noise_multiplier, 16))
    exact = shard_gaussian_epsilon(1e-5, event.noise_multiplier, 20, 300)  # closed form, not the accountant
    assert 4.8 < exact <= 5.0
    shards = assign_shards(400, 20, torch.Generator().manual_seed(0))
    everything = torch.cat(shards)
    assert len(shards) == 20 and sorted(everything.tolist()) == list(range(400))  # disjoint, covering


def _invoke(*args):
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("method,extra", [
    ("dp-gan", ["--epochs", "2", "--batch-size", "60", "--train-opts", "n_critic=2"]),
    ("efsgd-gan", ["--epochs", "1", "--batch-size", "60"]),
    ("gs-wgan", ["--batch-size", "8", "--train-opts", "discriminators=4,iterations=12,warmup_iters=4"]),
])
def test_every_gan_method_runs_all_stages_through_the_cli(tmp_path, method, extra):
    run = str(tmp_path / "run")
    common = ["--run", run, "--method", method, "--sensitive", "fashionmnist", "--limit", "300", "--public-size", "60000", "--resolution", "8"]
    assert "skipped" in _invoke("select-public", *common, "--quiet")
    assert "skipped" in _invoke("pretrain", *common, "--quiet")
    _invoke("finetune", *common, "--eps", "6", "--arch", "width=4,disc_width=4,latent_dim=4", *extra, "--quiet")
    _invoke("generate", "--run", run, "--n", "120", "--quiet")
    _invoke("evaluate", "--run", run, "--epochs", "1", "--quiet")
    manifest = yaml.safe_load((tmp_path / "run" / "manifest.yaml").read_text())
    events = manifest["privacy"]["events"]
    event = events[-1]
    assert event["stage"] == "finetune"
    assert event["mechanism"] == ("shard_gaussian" if method == "gs-wgan" else "poisson_gaussian")
    if method == "efsgd-gan":  # EFSGD's error feedback is a second, non-subsampled event (training/efsgd.py)
        assert [e["mechanism"] for e in events] == ["gaussian", "poisson_gaussian"]
        assert events[0]["steps"] == event["steps"]
    else:
        assert len(events) == 1
    config = manifest["stages"]["finetune"]["config"]
    if method == "gs-wgan":
        assert event["shards"] == 4 and event["steps"] == 12 and "sample_rate" not in event
        assert config["noise_multiplier_applied"] == pytest.approx(event["noise_multiplier"] * 2 * math.sqrt(8))
        exact = shard_gaussian_epsilon(manifest["privacy"]["delta"], event["noise_multiplier"], 4, 12)
        assert exact - 1e-6 <= manifest["privacy"]["epsilon"] <= min(exact + 0.03, 6.0)
    else:
        assert event["steps"] == config["discriminator_steps"] == round(300 / 60) * int(extra[1])
        _, estimate, upper = _prv_upper(events, manifest["privacy"]["delta"])
        assert estimate - 1e-6 <= manifest["privacy"]["epsilon"] <= upper + 0.02
        assert manifest["privacy"]["epsilon"] <= 6.0
    if method == "efsgd-gan":
        assert config["private_optimizer"] == "efsgd" and config["generator"]["noise_injection"] is True
    images = np.load(tmp_path / "run" / "synthetic.npz")["images"]
    assert images.shape == (120, 1, 8, 8) and images.dtype == np.uint8
    state = torch.load(tmp_path / "run" / "generator.pt", weights_only=True)
    assert not any(k.startswith("disc") for k in state["state_dict"])  # only the generator is written


def test_noise_injection_layers_exist_and_sampling_is_reproducible_from_the_seed():
    cfg = GANConfig(**{**TINY.to_dict(), "noise_injection": True})
    generator = ConditionalGenerator(cfg)
    for layer in (generator.up1.noise, generator.up2.noise):
        torch.nn.init.constant_(layer.weight, 0.5)
    labels = torch.tensor([0, 1, 2])
    a = generator.sample(labels, torch.Generator().manual_seed(3))
    b = generator.sample(labels, torch.Generator().manual_seed(3))
    assert a.dtype == torch.uint8 and a.shape == (3, 1, 8, 8) and torch.equal(a, b)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in generator.modules())


def test_dp_gan_refuses_per_sample_modes_that_would_see_the_fake_rows():
    from dpsynth.errors import BadInput

    method = get_method("dp-gan")
    for mode in ("hooks", "ghost"):
        with pytest.raises(BadInput, match="vmap"):
            method.plan_private(dataset_size=100, opts=resolve_options(method, FinetuneOptions(grad_sample_mode=mode)),
                                spent=[], eps=1.0, delta=1e-5)
