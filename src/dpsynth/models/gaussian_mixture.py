"""A class-conditional Gaussian mixture over pixels: dp-gmm's generator.

Class k has `components` Gaussians; component j has a weight, a mean, and a covariance kept as
its top `rank` principal directions (basis D x rank, standard deviations along them) plus an
isotropic residual standard deviation in the orthogonal complement. A sample is
    x = mean + basis (scales * z) + residual * (I - basis basis^T) w,   z ~ N(0, I_rank), w ~ N(0, I_D)
clamped to [0, 1]. Everything is a buffer (nothing here is trained by gradients); dp-gmm fills the
buffers from its noisy releases (post-processing only).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import BadInput


@dataclass(frozen=True)
class GaussianMixtureConfig:
    resolution: int = 28
    channels: int = 1
    num_classes: int = 10
    components: int = 8   # Gaussians per class
    rank: int = 10        # principal directions kept per Gaussian

    def to_dict(self) -> dict:
        return asdict(self)


class GaussianMixture(nn.Module):
    def __init__(self, cfg: GaussianMixtureConfig):
        super().__init__()
        dim = cfg.channels * cfg.resolution * cfg.resolution
        for name, value in (("components", cfg.components), ("rank", cfg.rank)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise BadInput(f"`arch` {name}={value!r} must be an integer >= 1")
        if cfg.rank > dim:
            raise BadInput(f"`arch` rank={cfg.rank} exceeds the {dim} pixels of a "
                           f"{cfg.channels}x{cfg.resolution}x{cfg.resolution} image")
        self.cfg = cfg
        k, m = cfg.num_classes, cfg.components
        self.register_buffer("weights", torch.full((k, m), 1.0 / m))
        self.register_buffer("means", torch.full((k, m, dim), 0.5))
        self.register_buffer("bases", torch.zeros(k, m, dim, cfg.rank))
        self.register_buffer("scales", torch.zeros(k, m, cfg.rank))
        self.register_buffer("residual", torch.zeros(k, m))

    @property
    def dim(self) -> int:
        return self.means.shape[-1]

    def set_component(self, label: int, component: int, *, weight: float, mean: torch.Tensor,
                      covariance: torch.Tensor) -> None:
        """Component (label, component) from an estimated (possibly indefinite, noisy) covariance:
        its top `rank` eigenpairs (negative eigenvalues count as 0) and, as the residual variance,
        the mean of the others (their sum is the unbiased trace left over, so noise does not inflate
        it the way clamping each eigenvalue at 0 would)."""
        r = self.cfg.rank
        values, vectors = torch.linalg.eigh((covariance + covariance.t()).double() / 2)
        rest = values[:-r]
        leftover = float(rest.mean().clamp(min=0)) if len(rest) else 0.0
        self.weights[label, component] = max(float(weight), 0.0)
        self.means[label, component] = mean.to(self.means)
        self.bases[label, component] = vectors[:, -r:].to(self.bases)
        self.scales[label, component] = values[-r:].clamp(min=0).sqrt().to(self.scales)
        self.residual[label, component] = leftover ** 0.5

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 images (N, C, H, W) for the given labels; every draw from `generator` (CPU)."""
        labels = labels.long().cpu()
        n, r = len(labels), self.cfg.rank
        weights = self.weights.cpu()[labels]
        weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, torch.ones_like(weights))
        component = torch.multinomial(weights, 1, generator=generator).flatten()
        z = torch.randn(n, r, generator=generator)
        w = torch.randn(n, self.dim, generator=generator)
        device = self.means.device
        labels, component, z, w = labels.to(device), component.to(device), z.to(device), w.to(device)
        basis = self.bases[labels, component]                              # (n, D, r)
        along = torch.einsum("ndr,nr->nd", basis, self.scales[labels, component] * z)
        across = w - torch.einsum("ndr,nr->nd", basis, torch.einsum("ndr,nd->nr", basis, w))
        x = self.means[labels, component] + along + self.residual[labels, component][:, None] * across
        c, s = self.cfg.channels, self.cfg.resolution
        return (x.clamp(0, 1) * 255.0).round().to(torch.uint8).reshape(n, c, s, s)
