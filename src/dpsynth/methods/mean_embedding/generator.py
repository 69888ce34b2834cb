"""A small class-conditional generator for the mean-embedding methods.

Trained only on released (noisy) embeddings, so it never needs per-sample gradients; it still
uses only Linear, Conv2d and GroupNorm as layers with parameters (no BatchNorm: its batch statistics would make one
generated image depend on the others, which the per-class averages do not expect). The label
enters as a one-hot vector concatenated to the latent code. Pixels come out through a sigmoid,
in [0, 1] like the sensitive images the features saw. Resolution: a multiple of 4.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class EmbeddingGeneratorConfig:
    resolution: int = 28
    channels: int = 1
    num_classes: int = 10
    latent_dim: int = 32
    hidden: int = 256     # fully connected width
    width: int = 16       # channels after the first upsampling; the smallest map has 2x

    def to_dict(self) -> dict:
        return asdict(self)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class EmbeddingGenerator(nn.Module):
    def __init__(self, cfg: EmbeddingGeneratorConfig):
        super().__init__()
        if cfg.resolution % 4:
            raise ValueError(f"resolution {cfg.resolution} must be a multiple of 4")
        self.cfg = cfg
        w, self.r = cfg.width, cfg.resolution // 4
        self.fc = nn.Sequential(
            nn.Linear(cfg.latent_dim + cfg.num_classes, cfg.hidden), nn.SiLU(),
            nn.Linear(cfg.hidden, 2 * w * self.r * self.r), nn.SiLU(),
        )
        # Convolutions run at half resolution; the last one emits 4 sub-pixels per channel that
        # PixelShuffle places (full-resolution convolutions cost ~5x more on a CPU).
        self.up = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(2 * w, w, 3, padding=1), _group_norm(w), nn.SiLU(),
            nn.Conv2d(w, w, 3, padding=1), _group_norm(w), nn.SiLU(),
            nn.Conv2d(w, 4 * cfg.channels, 3, padding=1), nn.PixelShuffle(2),
        )

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], shape (B, C, H, W)."""
        onehot = F.one_hot(labels.long(), self.cfg.num_classes).to(z.dtype)
        h = self.fc(torch.cat([z, onehot], dim=1)).view(len(z), -1, self.r, self.r)
        return torch.sigmoid(self.up(h))

    def latent(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        return torch.randn(n, self.cfg.latent_dim, generator=generator, device=device)

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 images (N, C, H, W) for the given labels."""
        device = next(self.parameters()).device
        z = self.latent(len(labels), generator).to(device)  # CPU generator: same draws on any device
        return (self(z, labels.to(device)) * 255.0).round().clamp(0, 255).to(torch.uint8)
