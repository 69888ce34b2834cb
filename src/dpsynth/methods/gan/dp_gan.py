"""DP-GAN: DP-SGD on the discriminator, the generator trained only through it.

One discriminator step = one Poisson batch of real images at rate q (drawn by index on
the device, `training.distributed.PoissonBatches`, exactly as `training.dpsgd.train_dp`; an
empty batch still takes its noise-only step) and ONE private per-sample gradient computation on the real rows only:

    L_real(x_i) = softplus(-D(x_i, y_i)) [+ recon_weight * mean((D.reconstruct(x_i) - x_i)^2)]

Each real row's gradient is clipped to `clip`, summed, Gaussian noise of std
sigma * clip added, and divided by the expected batch size (opacus' DPOptimizer, or
EFSGD's error-feedback optimizer via `make_private_optimizer`). Every term that touches
a real image, the reconstruction loss included, is inside that clipped per-sample loss.

The fake term softplus(D(G(z), y)) depends only on the generator and on latents/labels
drawn by us, i.e. on the discriminator and generator as they stand (themselves functions
of earlier noisy releases) and no sensitive data. Its gradient is computed separately
(per fake row, clipped to the same norm so that real and fake terms keep their relative
scale, no noise) and added to the noisy private gradient after the optimizer's noise step
and before the parameter update. Adding a quantity that is a function of earlier releases
and public randomness is post-processing inside an adaptive composition, so each
discriminator step releases exactly the accounted subsampled Gaussian mechanism
(noise multiplier sigma relative to L2 sensitivity `clip`): one PoissonGaussianEvent(sigma,
q, discriminator steps). The generator step (every `n_critic` discriminator steps) reads
only the discriminator and fresh latents: no sensitive data, no privacy cost.

Why not one opacus forward/backward over real and fake rows: with opacus' hooks, two
forwards of the private model (real, then fake) before one backward leave two activation
sets per layer, and the per-sample gradients it computes no longer correspond to the real
rows (tests/test_gan.py shows it). Here the private model sees one forward per step (vmap
computes each example on its own), and the fake term never enters grad_sample.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import BadInput
from ...progress import Progress, no_progress
from ...training.checkpoint import Checkpointing, capture_state, restore_model_and_optimizer, restore_rng
from ...training.distributed import PoissonBatches
from ...training.dp_guards import check_poisson_sampler
from ...training.dpsgd import (NO_CHECKPOINTS, DPSGDPlan, ExponentialMovingAverage, PerExampleGradients,
                               check_dp_compatible)
from ...training.options import FinetuneOptions
from ...training.private_optimizer import make_private_optimizer
from .models import ConditionalDiscriminator, ConditionalGenerator, to_unit


@dataclass(frozen=True)
class DPGANSchedule:
    """Discriminator steps (the accounted ones) and the generator steps between them."""

    dataset_size: int
    batch_size: int
    epochs: int
    n_critic: int

    def __post_init__(self) -> None:
        if not (isinstance(self.n_critic, int) and self.n_critic >= 1):
            raise BadInput(f"`train_opts` n_critic={self.n_critic!r} must be an integer >= 1")

    @property
    def dpsgd(self) -> DPSGDPlan:
        return DPSGDPlan(dataset_size=self.dataset_size, batch_size=self.batch_size, epochs=self.epochs)

    @property
    def sample_rate(self) -> float:
        return self.dpsgd.sample_rate

    @property
    def discriminator_steps(self) -> int:
        return self.dpsgd.steps

    @property
    def generator_steps(self) -> int:
        return self.discriminator_steps // self.n_critic


def real_loss(recon_weight: float):
    """The private per-sample loss of the discriminator on real rows (uint8 in, shape (B,))."""

    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return model(to_unit(x), y, recon_weight)

    return loss


def fake_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.softplus(model(x, y))


class PrivateDiscriminator(nn.Module):
    """Wraps the discriminator so that `forward(x, y, recon_weight)` is the per-sample real
    loss (one forward, usable by vmap/opacus) and `forward(x, y)` the logits."""

    def __init__(self, disc: ConditionalDiscriminator):
        super().__init__()
        self.disc = disc

    def forward(self, x: torch.Tensor, y: torch.Tensor, recon_weight: float | None = None) -> torch.Tensor:
        if recon_weight is None:
            return self.disc(x, y)
        h = self.disc.features(x)
        loss = F.softplus(-self.disc.logits(h, y))
        if recon_weight > 0:
            loss = loss + recon_weight * (self.disc.reconstruct(h) - x).pow(2).flatten(1).mean(1)
        return loss


def clipped_sum_of_grad_samples(params: list[nn.Parameter], clip: float) -> list[torch.Tensor]:
    """Sum over rows of per-row gradients clipped to L2 norm `clip` (over all parameters)."""
    norms = torch.stack([p.grad_sample.flatten(1).norm(dim=1) for p in params], dim=1).norm(dim=1)
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    return [torch.einsum("i,i...->...", factor, p.grad_sample) for p in params]


def train_dp_gan(generator: ConditionalGenerator, images: torch.Tensor, labels: torch.Tensor, *,
                 schedule: DPGANSchedule, noise_multiplier: float, opts: FinetuneOptions,
                 device: torch.device | None = None, progress: Progress = no_progress,
                 phase: str = "finetune (DP-GAN, DP discriminator)",
                 checkpoints: Checkpointing = NO_CHECKPOINTS) -> tuple[ConditionalGenerator, dict]:
    """Run exactly `schedule.discriminator_steps` noisy discriminator steps; returns the
    generator (EMA weights when opts.ema) and counters {"discriminator_steps", "generator_steps"}.
    opts: clip, lr (discriminator), ema, grad_sample_mode (vmap), private_optimizer,
    feedback_clip, train_opts g_lr, beta1, recon_weight. checkpoints (training.checkpoint):
    a resumed run restores generator, discriminator, both optimizers (EFSGD's error state is
    the discriminator optimizer's), the EMA and the RNG, and continues after that step."""
    t = opts.train_opts or {}
    clip, g_lr, beta1, recon_weight = opts.clip, t["g_lr"], t["beta1"], t["recon_weight"]
    if (opts.grad_sample_mode or "vmap") != "vmap":  # opacus' hooks would also fire on the fake rows
        raise BadInput(f"grad_sample_mode={opts.grad_sample_mode}: DP-GAN computes per-example gradients with vmap")
    # schedule.dataset_size is the declared N: it alone sets q, the steps and the denominator.
    device = device or torch.device("cpu")
    cfg = generator.cfg
    if recon_weight > 0 and not cfg.reconstruction:
        cfg = type(cfg)(**{**cfg.to_dict(), "reconstruction": True})
    disc = PrivateDiscriminator(ConditionalDiscriminator(cfg)).to(device)
    check_dp_compatible(disc)
    generator.to(device).train()
    d_params = [p for p in disc.parameters() if p.requires_grad]
    g_params = [p for p in generator.parameters() if p.requires_grad]
    real_grads = PerExampleGradients(disc, real_loss(recon_weight), "vmap")
    fake_grads = PerExampleGradients(disc, fake_loss, "vmap")  # non-private rows: vmap never mixes them
    base = torch.optim.Adam(disc.parameters(), lr=opts.lr, betas=(beta1, 0.999))
    g_optimizer = torch.optim.Adam(generator.parameters(), lr=g_lr, betas=(beta1, 0.999))
    tracker = ExponentialMovingAverage(generator, opts.ema) if opts.ema else None
    resume = checkpoints.resume
    start = 0
    if resume:  # before the private optimizer wraps `base`, as train_dp does
        start = restore_model_and_optimizer(resume, generator, g_optimizer, tracker)
        disc.load_state_dict(resume["extra"]["discriminator"])
        base.load_state_dict(resume["extra"]["discriminator_optimizer"])
    expected_batch = schedule.dataset_size * schedule.sample_rate
    dp_optimizer = make_private_optimizer(opts.private_optimizer or "dpsgd", base, noise_multiplier=noise_multiplier,
                                          clip=clip, expected_batch_size=expected_batch,
                                          feedback_clip=opts.feedback_clip)
    # Poisson batches by index on the device, from its global RNG (reseeded from OS entropy by
    # the stage): secret. Exactly the accounted steps per epoch (opacus' int(1/q) can be one short).
    per_epoch = schedule.dpsgd.steps_per_epoch
    batches = PoissonBatches(images, labels, sample_rate=schedule.sample_rate, steps=per_epoch, device=device)
    check_poisson_sampler(batches, schedule.sample_rate, per_epoch)
    released: list[int] = []  # one entry per noisy release (set by the step hook)
    fake_batch = max(1, round(expected_batch))  # public: the expected, not the actual, batch size
    num_classes = cfg.num_classes
    d_steps, g_steps = start, start // schedule.n_critic
    if resume:
        restore_rng(resume)  # last: the next draw is the first resumed step's
    for epoch in range(start // per_epoch, schedule.epochs):
        todo = per_epoch - start % per_epoch if epoch == start // per_epoch else per_epoch
        for x, y in itertools.islice(batches, todo):
            # -- fake term: no sensitive data; per-row clipped, summed, no noise --------------
            with torch.no_grad():
                y_fake = torch.randint(0, num_classes, (fake_batch,), device=device)
                x_fake = generator(generator.latent(fake_batch, device), y_fake)
            fake_grads.compute(x_fake, y_fake)
            fake_sum = clipped_sum_of_grad_samples(d_params, clip)
            for p in d_params:
                p.grad_sample = None
            # -- private term: real rows only, one per-sample computation -----------------------
            dp_optimizer.zero_grad(set_to_none=True)
            if len(x):
                real_grads.compute(x, y)
            else:  # an empty Poisson batch still takes its noise-only step
                for p in d_params:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            dp_optimizer.signal_skip_step(do_skip=False)
            released.clear()
            # clip, sum, noise, / expected batch (p.grad is then the release), the hook adds the
            # fake term, the base optimizer steps (EFSGD then commits its error state)
            dp_optimizer.step_hook = lambda opt, fake=fake_sum: add_fake_term(opt, d_params, fake, expected_batch,
                                                                              released)
            dp_optimizer.step()
            if not released or dp_optimizer._is_last_step_skipped:
                raise RuntimeError("DP optimizer skipped a discriminator step that the ledger counts")
            d_steps += 1
            if d_steps % schedule.n_critic == 0:
                generator_step(generator, disc, g_optimizer, g_params, fake_batch, num_classes, device)
                g_steps += 1
                if tracker is not None:
                    tracker.update(generator)
            progress(phase, d_steps, schedule.discriminator_steps)
            checkpoints(d_steps, lambda: capture_state(d_steps, generator, g_optimizer, tracker, discriminator=disc,
                                                       discriminator_optimizer=base))
    if d_steps != schedule.discriminator_steps or g_steps != schedule.generator_steps:
        raise RuntimeError(f"ran {d_steps} discriminator steps (ledger: {schedule.discriminator_steps}) and "
                           f"{g_steps} generator steps (planned: {schedule.generator_steps})")
    if tracker is not None:
        generator.load_state_dict(tracker.state_dict())
    return generator, {"discriminator_steps": d_steps, "generator_steps": g_steps}


def add_fake_term(optimizer, params, fake_sum, expected_batch: float, released: list) -> None:
    """opacus step hook, run right after the noise is added and scaled: p.grad holds the noisy
    private gradient; adding the (data-independent) fake term is post-processing."""
    for p, f in zip(params, fake_sum):
        p.grad = p.grad + f / expected_batch
    released.append(1)


def generator_step(generator, disc, g_optimizer, g_params, batch: int, num_classes: int, device) -> None:
    """Non-saturating generator loss through the discriminator: reads no sensitive data."""
    y = torch.randint(0, num_classes, (batch,), device=device)
    loss = F.softplus(-disc(generator(generator.latent(batch, device), y), y)).mean()
    grads = torch.autograd.grad(loss, g_params)
    for p, g in zip(g_params, grads):
        p.grad = g
    g_optimizer.step()
    g_optimizer.zero_grad(set_to_none=True)
