"""GS-WGAN (Chen, Orekondy, Fritz, NeurIPS 2020): gradient-sanitized WGAN-GP.

Mechanism
- The sensitive set is split into N_d disjoint shards; each image's shard is drawn
  independently and uniformly from a generator seeded with OS entropy (never written, drawn
  afresh for every run). Independent assignment keeps every other image's shard identically
  distributed when one image is added or removed, which the argument below needs.
- Discriminator k is warm-started on shard k only (WGAN-GP against its own throwaway copy
  of the initial generator, as GS-WGAN's pre-training does). Discriminators and their
  copies are hidden state: never written, never returned.
- Each generator step draws one discriminator k uniformly, updates it `critic_iters` times
  on minibatches of its own shard (WGAN-GP + GS-WGAN's epsilon penalty), then releases to
  the generator only g_i = clip_C(d(-D_k(x_i, y_i))/d x_i) + N(0, (sigma_applied * C)^2 I)
  for each of the B fake samples x_i = G(z_i, y_i). The generator's update is a function of
  those B noisy vectors (post-processing).

Sensitivity of one step. The release is the B x (C*H*W) matrix of clipped per-fake-sample
gradients. All B rows depend on the chosen discriminator, which depends on every image of
its shard: when x's shard s is chosen and x is added or removed, D_s can change
arbitrarily, so each clipped row can move anywhere within its C-ball (by up to 2C) and the
matrix by up to 2C*sqrt(B) in Frobenius (L2) norm. Rows are not separately private: they
share D_s. With per-coordinate noise std sigma_applied * C the step is a Gaussian mechanism
with noise multiplier sigma = sigma_applied / (2 sqrt(B)) relative to that sensitivity.
When another shard is chosen the release does not depend on x (critic k != s sees only
shard k, and the other images' shards are distributed alike with or without x).

Privacy of T steps (ShardGaussianEvent, privacy/accountant.py). x's shard s is fixed for
the whole run, so x influences exactly the steps that draw s: not a fresh Bernoulli(1/N_d)
per step, so GS-WGAN's Poisson-style amplification by q = 1/N_d has no proof here (its
epsilon is 4-45x below the bound below on our recipes). We give the adversary the index sequence
k_1..k_T (data-independent). Given it and s, x touches K_s = #{t: k_t = s} steps, each a
Gaussian release of multiplier sigma on an adaptively chosen query (the hidden critic
state is a function of the data, public outputs and data-independent randomness), so the
pair is dominated by the K_s-fold Gaussian N(sqrt(K_s)/sigma, 1) vs N(0, 1). s is uniform,
secret and independent of the sequence; by joint convexity of the hockey-stick divergence
the mixture over s is dominated by the average over s, in both directions (the Gaussian
pair is symmetric), and averaging over the public sequence gives
  delta(eps) <= E_{K ~ Bin(T, 1/N_d)} [delta_Gauss(eps; sqrt(K)/sigma)],
which is the hockey-stick curve of the T-fold product of the one-step pair with the
"used x's shard" bit visible: that product is what the ledger composes. The ledger records
ShardGaussianEvent(noise_multiplier = sigma, shards = N_d, steps = T); calibration solves
sigma and applies sigma_applied = sigma * 2 sqrt(B). Only the K ~ T/N_d steps that use x's
shard count, but they count in full (mu ~ sqrt(T/N_d)/sigma): epsilon depends on T and N_d
only through Bin(T, 1/N_d).

Checkpoints (`finetune --checkpoint-every`, Ctrl-C, `--resume`) hold the generator, its
optimizer and EMA, the RNG state, the shard assignment and every discriminator with its
optimizer: secrets, kept only in the stage's checkpoints, which are deleted when the stage
completes. A run resumed from one skips the warm-up and continues after its step.

GS-WGAN's own analysis (code: evaluation/privacy_analysis.py) composes B * iterations
separately subsampled per-sample Gaussians: the B rows of one step share one discriminator
(an under-count), and the subsampling amplification is unproven for persistent shards
(docs/DECISIONS.md, "GANs (issue 5)" and "GS-WGAN's accounting (issue 11)").
"""

from __future__ import annotations

import copy
import math
import secrets

import torch
from torch import nn

from ...errors import BadInput
from ...progress import Progress, no_progress
from ...training.checkpoint import Checkpointing, capture_state, restore_model_and_optimizer, restore_rng
from .models import ConditionalDiscriminator, ConditionalGenerator, to_unit


def assign_shards(n: int, shards: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Indices of each shard: every image in exactly one, drawn iid uniformly (secret RNG)."""
    if not (isinstance(shards, int) and 1 <= shards <= n):
        raise BadInput(f"`train_opts` discriminators={shards!r} must be an integer between 1 and the dataset size {n}")
    if generator is None:
        generator = torch.Generator().manual_seed(secrets.randbits(63))
    owner = torch.randint(0, shards, (n,), generator=generator)
    order = torch.argsort(owner, stable=True)
    counts = torch.bincount(owner, minlength=shards).tolist()
    return list(torch.split(order, counts))


def applied_noise_multiplier(accounted: float, batch_size: int) -> float:
    """Per-coordinate noise std / C that makes the B-row release a Gaussian mechanism with
    noise multiplier `accounted` relative to its sensitivity 2C sqrt(B)."""
    return accounted * 2.0 * math.sqrt(batch_size)


def sanitize(grads: torch.Tensor, clip: float, noise_multiplier_applied: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisy, clipped): each row (one fake sample) clipped to L2 norm `clip`, then
    N(0, (noise_multiplier_applied * clip)^2) added to every coordinate."""
    flat = grads.flatten(1)
    factor = (clip / (flat.norm(dim=1, keepdim=True) + 1e-12)).clamp(max=1.0)
    clipped = (flat * factor).view_as(grads)
    noise = torch.randn(grads.shape, device=grads.device, dtype=grads.dtype) * (noise_multiplier_applied * clip)
    return clipped + noise, clipped


def gradient_penalty(disc: nn.Module, real: torch.Tensor, fake: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """WGAN-GP (Gulrajani et al. 2017): (||grad_x D(x_hat)|| - 1)^2 on random interpolates."""
    t = torch.rand(len(real), 1, 1, 1, device=real.device)
    mixed = (t * real + (1 - t) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(disc(mixed, y).sum(), mixed, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()


class Critic:
    """One discriminator, its optimizer and its shard (hidden state)."""

    def __init__(self, cfg, shard: torch.Tensor, lr: float, betas: tuple[float, float], device):
        self.net = ConditionalDiscriminator(cfg).to(device)
        self.shard = shard
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=lr, betas=betas)

    @classmethod
    def restored(cls, cfg, shard: torch.Tensor, state: dict, lr: float, betas, device) -> "Critic":
        critic = cls(cfg, shard, lr, betas, device)
        critic.net.load_state_dict(state["net"])
        critic.optimizer.load_state_dict(state["optimizer"])
        return critic

    def update(self, images, labels, generator: ConditionalGenerator, batch: int, gp_weight: float,
               eps_weight: float, device) -> None:
        idx = self.shard[torch.randint(0, len(self.shard), (batch,))]
        real, y = to_unit(images[idx].to(device)), labels[idx].to(device)
        with torch.no_grad():
            fake = generator(generator.latent(len(y), device), y)
        real_score = self.net(real, y)
        loss = (self.net(fake, y).mean() - real_score.mean() + gp_weight * gradient_penalty(self.net, real, fake, y)
                + eps_weight * real_score.pow(2).mean())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def train_gs_wgan(generator: ConditionalGenerator, images: torch.Tensor, labels: torch.Tensor, *,
                  discriminators: int, iterations: int, batch_size: int, clip: float, noise_multiplier_applied: float,
                  lr: float, betas: tuple[float, float], critic_iters: int, warmup_iters: int, gp_weight: float,
                  eps_weight: float, ema: float | None = None, device=None, progress: Progress = no_progress,
                  shard_generator: torch.Generator | None = None,
                  checkpoints: Checkpointing | None = None) -> tuple[ConditionalGenerator, dict]:
    """Exactly `iterations` sanitized generator steps; returns (generator, counters)."""
    from ...training.dpsgd import NO_CHECKPOINTS, ExponentialMovingAverage

    checkpoints = checkpoints or NO_CHECKPOINTS
    resume = checkpoints.resume
    device = device or torch.device("cpu")
    generator.to(device).train()
    cfg = generator.cfg
    if resume:  # the interrupted attempt's shards and discriminators: no second warm-up
        shards = [s.to(torch.long) for s in resume["extra"]["shards"]]
        critics = [None if state is None else Critic.restored(cfg, shard, state, lr, betas, device)
                   for shard, state in zip(shards, resume["extra"]["critics"])]
    else:
        shards = assign_shards(len(images), discriminators, shard_generator)
        critics = []
        for k, shard in enumerate(shards):
            if len(shard) == 0:  # an empty shard has no discriminator to train; it still gets chosen
                critics.append(None)
                continue
            critic = Critic(cfg, shard, lr, betas, device)
            warm_up(critic, images, labels, copy.deepcopy(generator), warmup_iters, critic_iters, batch_size,
                    gp_weight, eps_weight, lr, betas, device)
            critics.append(critic)
            progress("GS-WGAN warm-up (hidden discriminators)", k + 1, discriminators)
    if len(shards) != discriminators:
        raise RuntimeError(f"{len(shards)} shards, planned {discriminators}")
    tracker = ExponentialMovingAverage(generator, ema) if ema else None
    g_optimizer = torch.optim.Adam(generator.parameters(), lr=lr, betas=betas)
    blank = ConditionalDiscriminator(cfg).to(device)  # stands for an empty shard: depends on no data
    steps = 0
    if resume:
        steps = restore_model_and_optimizer(resume, generator, g_optimizer, tracker)
        blank.load_state_dict(resume["extra"]["blank"])
        restore_rng(resume)  # last: the next draw is the first resumed step's

    def snapshot() -> dict:
        hidden = [None if c is None else {"net": c.net.state_dict(), "optimizer": c.optimizer.state_dict()}
                  for c in critics]
        return capture_state(steps, generator, g_optimizer, tracker, shards=shards, critics=hidden, blank=blank)

    for _ in range(steps, iterations):
        k = int(torch.randint(0, discriminators, (1,)))
        critic = critics[k]
        if critic is not None:
            for _ in range(critic_iters):
                critic.update(images, labels, generator, batch_size, gp_weight, eps_weight, device)
        net = critic.net if critic is not None else blank
        sanitized_generator_step(generator, net, g_optimizer, batch_size, clip, noise_multiplier_applied, device)
        steps += 1
        if tracker is not None:
            tracker.update(generator)
        progress("finetune (GS-WGAN, sanitized)", steps, iterations)
        checkpoints(steps, snapshot)
    if steps != iterations:
        raise RuntimeError(f"ran {steps} sanitized generator steps but the ledger recorded {iterations}")
    if tracker is not None:
        generator.load_state_dict(tracker.state_dict())
    del critics  # the discriminators saw sensitive data without DP: they die here
    return generator, {"generator_steps": steps, "shard_sizes_min": min(map(len, shards))}


def warm_up(critic: Critic, images, labels, throwaway: ConditionalGenerator, iters: int, critic_iters: int,
            batch: int, gp_weight: float, eps_weight: float, lr: float, betas, device) -> None:
    """Non-private WGAN-GP on the critic's own shard against its own generator copy, so the
    critic depends on its shard only. Nothing here leaves this function but the critic."""
    if iters <= 0:
        return
    optimizer = torch.optim.Adam(throwaway.parameters(), lr=lr, betas=betas)
    for i in range(iters):
        critic.update(images, labels, throwaway, batch, gp_weight, eps_weight, device)
        if (i + 1) % critic_iters == 0:
            y = torch.randint(0, throwaway.cfg.num_classes, (batch,), device=device)
            loss = -critic.net(throwaway(throwaway.latent(batch, device), y), y).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    critic.net.zero_grad(set_to_none=True)


def sanitized_generator_step(generator: ConditionalGenerator, disc: nn.Module, optimizer, batch: int, clip: float,
                             noise_multiplier_applied: float, device) -> torch.Tensor:
    """One generator update from the sanitized per-fake-sample gradients; returns them."""
    y = torch.randint(0, generator.cfg.num_classes, (batch,), device=device)
    fake = generator(generator.latent(batch, device), y)
    x = fake.detach().requires_grad_(True)
    # Per-sample: the sum's gradient w.r.t. row i is d(-D(x_i, y_i))/dx_i (D has no batch coupling).
    (grads,) = torch.autograd.grad(-disc(x, y).sum(), x)
    noisy, _ = sanitize(grads, clip, noise_multiplier_applied)
    optimizer.zero_grad(set_to_none=True)
    fake.backward(noisy / batch)  # the generator loss is the mean over the batch
    optimizer.step()
    disc.zero_grad(set_to_none=True)
    return noisy
