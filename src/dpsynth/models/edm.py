"""EDM diffusion (Karras et al., 2022) around the conditional U-Net: preconditioning,
the per-sample denoising loss DP-SGD trains on, and a deterministic Heun sampler.

`forward(x, y)` IS the training loss, one value per row, so opacus sees a plain module
whose forward takes a batch and returns per-sample losses (the same contract as the
CVAE). Noise levels and noise draws are random per row; DP-SGD's noise multiplicity
repeats each image K times before this forward and averages its K losses' gradients.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from ..errors import BadInput
from .unet import ConditionalUNet, UNetConfig


@dataclass(frozen=True)
class EDMConfig:
    resolution: int = 28
    channels: int = 1
    num_classes: int = 10
    width: int = 36
    ch_mult: tuple[int, ...] = (2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (-1,)
    dropout: float = 0.0
    sigma_data: float = 0.5
    p_mean: float = -1.2           # ln(sigma) ~ N(p_mean, p_std^2) during training (EDM, DPDM)
    p_std: float = 1.2
    label_dropout: float = 0.0     # > 0 trains the null label too, for classifier-free guidance
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0

    def __post_init__(self) -> None:
        if not (0.0 <= self.label_dropout < 1.0):
            raise BadInput(f"model label_dropout {self.label_dropout} must be in [0, 1)")
        if not (0 < self.sigma_min < self.sigma_max):
            raise BadInput(f"model sigma_min {self.sigma_min} must be > 0 and < sigma_max {self.sigma_max}")

    def unet(self) -> UNetConfig:
        names = {f.name for f in fields(UNetConfig)}
        return UNetConfig(**{k: v for k, v in asdict(self).items() if k in names})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ch_mult"], d["attn_resolutions"] = list(self.ch_mult), list(self.attn_resolutions)
        return d


class EDMDiffusion(nn.Module):
    def __init__(self, cfg: EDMConfig):
        super().__init__()
        self.cfg = cfg
        self.net = ConditionalUNet(cfg.unet())

    @staticmethod
    def to_model_range(x: torch.Tensor) -> torch.Tensor:
        return x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sd = self.cfg.sigma_data
        sigma = sigma.reshape(-1, 1, 1, 1)
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1.0 / (sigma ** 2 + sd ** 2).sqrt()
        c_noise = sigma.log().flatten() / 4.0
        return c_skip * x + c_out * self.net(c_in * x, c_noise, labels)

    def forward(self, x: torch.Tensor, labels: torch.Tensor, sigma: torch.Tensor | None = None,
                noise: torch.Tensor | None = None) -> torch.Tensor:
        """Per-row EDM loss: lambda(sigma) * mean squared denoising error. sigma and the unit
        noise are drawn per row unless given (tests pass fixed draws)."""
        x = self.to_model_range(x)
        n = x.shape[0]
        if sigma is None:
            sigma = (torch.randn(n, device=x.device) * self.cfg.p_std + self.cfg.p_mean).exp()
        if self.cfg.label_dropout > 0 and self.training:
            drop = torch.rand(n, device=x.device) < self.cfg.label_dropout
            labels = torch.where(drop, torch.full_like(labels, self.cfg.num_classes), labels)
        noisy = x + (torch.randn_like(x) if noise is None else noise) * sigma.reshape(-1, 1, 1, 1)
        weight = (sigma ** 2 + self.cfg.sigma_data ** 2) / (sigma * self.cfg.sigma_data) ** 2
        err = (self.denoise(noisy, sigma, labels) - x) ** 2
        return weight * err.flatten(1).mean(dim=1)

    def noise_levels(self, steps: int, device: torch.device) -> torch.Tensor:
        c = self.cfg
        i = torch.arange(steps, dtype=torch.float64, device=device)
        inv = 1.0 / c.rho
        t = (c.sigma_max ** inv + i / max(steps - 1, 1) * (c.sigma_min ** inv - c.sigma_max ** inv)) ** c.rho
        return torch.cat([t, torch.zeros(1, dtype=torch.float64, device=device)])

    def _guided(self, x: torch.Tensor, sigma: float, labels: torch.Tensor, guidance: float) -> torch.Tensor:
        s = torch.full((x.shape[0],), sigma, device=x.device)
        cond = self.denoise(x, s, labels)
        if guidance == 0.0:
            return cond
        uncond = self.denoise(x, s, torch.full_like(labels, self.cfg.num_classes))
        return cond + guidance * (cond - uncond)

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, generator: torch.Generator | None = None, steps: int = 18,
               guidance: float = 0.0) -> torch.Tensor:
        """EDM's deterministic 2nd-order (Heun) sampler; returns uint8 images."""
        if steps < 2:
            raise BadInput(f"steps={steps} must be >= 2")
        device = next(self.parameters()).device
        c = self.cfg
        t = self.noise_levels(steps, device)
        shape = (len(labels), c.channels, c.resolution, c.resolution)
        x = torch.randn(shape, generator=generator).to(device, torch.float64) * t[0]
        labels = labels.to(device)
        for i in range(steps):
            t_cur, t_next = float(t[i]), float(t[i + 1])
            d_cur = (x - self._guided(x.float(), t_cur, labels, guidance).double()) / t_cur
            x_next = x + (t_next - t_cur) * d_cur
            if t_next > 0:
                d_next = (x_next - self._guided(x_next.float(), t_next, labels, guidance).double()) / t_next
                x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_next)
            x = x_next
        return ((x.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).cpu()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

