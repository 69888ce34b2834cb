"""Class-conditional VAE: the generator backbone of the pipeline's default method.

Chosen because its DP-SGD training is stable with few steps (one loss, no adversary)
and generation is a single decoder pass. Only layers opacus computes per-sample
gradients for (Linear, Conv2d, GroupNorm, Embedding); no BatchNorm.
Sizes adapt to the run's resolution (a multiple of 4) and channel count.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class CVAEConfig:
    resolution: int = 28
    channels: int = 1
    num_classes: int = 10
    latent_dim: int = 16
    width: int = 16          # channels of the first feature map; the second has 2x
    hidden: int = 128        # width of the fully connected layer (small: DP noise grows with parameters)

    def to_dict(self) -> dict:
        return asdict(self)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class Encoder(nn.Module):
    def __init__(self, cfg: CVAEConfig):
        super().__init__()
        w, r = cfg.width, cfg.resolution // 4
        self.features = nn.Sequential(
            nn.Conv2d(cfg.channels, w, 3, stride=2, padding=1), _group_norm(w), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), _group_norm(2 * w), nn.SiLU(),
            nn.Flatten(),
        )
        self.label = nn.Embedding(cfg.num_classes, cfg.hidden)
        self.fc = nn.Linear(2 * w * r * r, cfg.hidden)
        self.head = nn.Linear(cfg.hidden, 2 * cfg.latent_dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.silu(self.fc(self.features(x)) + self.label(y))
        mean, log_var = self.head(h).chunk(2, dim=1)
        return mean, log_var.clamp(-8.0, 8.0)


class Decoder(nn.Module):
    def __init__(self, cfg: CVAEConfig):
        super().__init__()
        w, self.r = cfg.width, cfg.resolution // 4
        self.w = w
        self.latent = nn.Linear(cfg.latent_dim, cfg.hidden)
        self.label = nn.Embedding(cfg.num_classes, cfg.hidden)
        self.fc = nn.Linear(cfg.hidden, 2 * w * self.r * self.r)
        self.up = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(2 * w, w, 3, padding=1), _group_norm(w), nn.SiLU(),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(w, w, 3, padding=1), _group_norm(w), nn.SiLU(),
            nn.Conv2d(w, cfg.channels, 3, padding=1),
        )

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.latent(z) + self.label(y))
        h = F.silu(self.fc(h)).view(-1, 2 * self.w, self.r, self.r)
        return self.up(h)  # logits of pixel intensities in [0, 1]


class ConditionalVAE(nn.Module):
    def __init__(self, cfg: CVAEConfig):
        super().__init__()
        if cfg.resolution % 4:
            raise ValueError(f"resolution {cfg.resolution} must be a multiple of 4")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample negative ELBO (nats), shape (B,): DP-SGD needs per-sample losses."""
        mean, log_var = self.encoder(x, y)
        z = mean + torch.randn_like(mean) * (0.5 * log_var).exp()
        logits = self.decoder(z, y)
        recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
        kl = 0.5 * (mean.pow(2) + log_var.exp() - 1.0 - log_var).sum(1)
        return recon + kl

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 images (N, C, H, W) for the given labels; the decoder mean, not a noisy draw."""
        device = next(self.parameters()).device
        z = torch.randn(len(labels), self.cfg.latent_dim, generator=generator).to(device)  # CPU generator: any device
        probs = torch.sigmoid(self.decoder(z, labels.to(device)))
        return (probs * 255.0).round().clamp(0, 255).to(torch.uint8)

