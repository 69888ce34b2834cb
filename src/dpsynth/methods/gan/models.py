"""Conditional generator and discriminator shared by the GAN methods.

Only Linear, Conv2d, GroupNorm and Embedding layers (no BatchNorm: it mixes samples and
would break per-sample clipping). Sizes adapt to the run's resolution (a multiple of 4)
and channel count. Images live in [-1, 1] inside the networks; `sample` returns uint8.

Options:
- `noise_injection` (StyleGAN, Karras et al. 2019): after each upsampling block the
  generator adds per-pixel Gaussian noise, one draw per pixel shared by the channels,
  scaled by a learned per-channel weight (initialised at 0, so it starts as a no-op);
- `reconstruction` (discriminator): an auxiliary decoder head that reconstructs the
  discriminator's input from its features, trained with an L2 loss inside the private
  per-sample loss (see `dp_gan.py`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GANConfig:
    resolution: int = 28
    channels: int = 1
    num_classes: int = 10
    latent_dim: int = 32
    width: int = 32              # generator channels at full resolution; 2x and 4x below
    noise_injection: bool = False
    disc_width: int = 32         # discriminator channels (the discriminator is never saved)
    reconstruction: bool = False  # discriminator decoder head for the L2 reconstruction loss

    def to_dict(self) -> dict:
        return asdict(self)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


def upsample2(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour x2 upsampling (same values as F.interpolate; about 2x faster on CPU)."""
    n, c, h, w = x.shape
    return x[:, :, :, None, :, None].expand(n, c, h, 2, w, 2).reshape(n, c, 2 * h, 2 * w)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] (or float already in [-1, 1]) -> float in [-1, 1]."""
    return x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x


class NoiseInjection(nn.Module):
    """x + w_c * n, n ~ N(0, 1) per pixel (shared by channels), w learned per channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        n, _, h, w = x.shape
        if generator is None:
            noise = torch.randn(n, 1, h, w, device=x.device, dtype=x.dtype)
        else:  # a seeded CPU generator at sampling time: draw on the CPU, then move
            noise = torch.randn(n, 1, h, w, generator=generator).to(x.device, x.dtype)
        return x + self.weight * noise


class UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, noise: bool):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm = _norm(cout)
        self.noise = NoiseInjection(cout) if noise else None

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = self.conv(upsample2(x))
        if self.noise is not None:
            x = self.noise(x, generator)
        return F.relu(self.norm(x))


class ConditionalGenerator(nn.Module):
    """z (latent_dim) and a class label -> image in [-1, 1] (tanh)."""

    def __init__(self, cfg: GANConfig):
        super().__init__()
        if cfg.resolution % 4:
            raise ValueError(f"resolution {cfg.resolution} must be a multiple of 4")
        self.cfg = cfg
        w, self.r = cfg.width, cfg.resolution // 4
        self.label = nn.Embedding(cfg.num_classes, cfg.latent_dim)
        self.fc = nn.Linear(cfg.latent_dim, 4 * w * self.r * self.r)
        self.fc_norm = _norm(4 * w)
        self.up1 = UpBlock(4 * w, 2 * w, cfg.noise_injection)
        self.up2 = UpBlock(2 * w, w, cfg.noise_injection)
        self.out = nn.Conv2d(w, cfg.channels, 3, padding=1)

    def forward(self, z: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        h = self.fc(z * self.label(y)).view(len(z), 4 * self.cfg.width, self.r, self.r)
        h = F.relu(self.fc_norm(h))
        h = self.up2(self.up1(h, generator), generator)
        return torch.tanh(self.out(h))

    def latent(self, n: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        if generator is None:
            return torch.randn(n, self.cfg.latent_dim, device=device)
        return torch.randn(n, self.cfg.latent_dim, generator=generator).to(device)

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 images (N, C, H, W) for the given labels (latents and injected noise from `generator`)."""
        device = next(self.parameters()).device
        labels = labels.to(device)
        images = self(self.latent(len(labels), device, generator), labels, generator)
        return ((images + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


class ConditionalDiscriminator(nn.Module):
    """Image in [-1, 1] and label -> logit (projection discriminator, Miyato & Koyama 2018).

    GroupNorm works within one sample, so each sample's output depends on that sample only
    (required by per-sample clipping). With cfg.reconstruction, `reconstruct` decodes the
    features back to an image (the auxiliary L2 head)."""

    def __init__(self, cfg: GANConfig):
        super().__init__()
        if cfg.resolution % 4:
            raise ValueError(f"resolution {cfg.resolution} must be a multiple of 4")
        self.cfg = cfg
        w, self.r = cfg.disc_width, cfg.resolution // 4
        self.conv1 = nn.Conv2d(cfg.channels, w, 4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(w, 2 * w, 4, stride=2, padding=1)
        self.norm2 = _norm(2 * w)
        self.fc = nn.Linear(2 * w * self.r * self.r, 4 * w)
        self.head = nn.Linear(4 * w, 1)
        self.embed = nn.Embedding(cfg.num_classes, 4 * w)
        if cfg.reconstruction:
            self.dec_fc = nn.Linear(4 * w, 2 * w * self.r * self.r)
            self.dec_up1 = nn.Conv2d(2 * w, w, 3, padding=1)
            self.dec_out = nn.Conv2d(w, cfg.channels, 3, padding=1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.conv1(x), 0.2)
        h = F.leaky_relu(self.norm2(self.conv2(h)), 0.2)
        return F.leaky_relu(self.fc(h.flatten(1)), 0.2)

    def logits(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.head(h).squeeze(1) + (self.embed(y) * h).sum(1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.logits(self.features(x), y)

    def reconstruct(self, h: torch.Tensor) -> torch.Tensor:
        w = self.cfg.disc_width
        d = F.leaky_relu(self.dec_fc(h), 0.2).view(len(h), 2 * w, self.r, self.r)
        d = F.leaky_relu(self.dec_up1(upsample2(d)), 0.2)
        return torch.tanh(self.dec_out(upsample2(d)))
