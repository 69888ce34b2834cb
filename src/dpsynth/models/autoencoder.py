"""KL-regularised convolutional autoencoder (the first stage of a latent diffusion model,
Rombach et al., 2022), as DP-LDM and DP-LoRA use it in DPImageBench: one downsampling
level (factor f = 2), so 28x28 images become 14x14 latents and 32x32 become 16x16.

The encoder gives the moments (mean, log-variance) of a diagonal Gaussian posterior per
latent pixel; the loss per image is the L1 reconstruction error plus `kl_weight` times the
KL divergence to N(0, I), both summed over pixels as in the LDM code and divided by the
pixel count (one scale for both, so their ratio is the LDM's). DPImageBench adds LPIPS and
a patch discriminator; dpsynth has neither (LPIPS needs ImageNet-trained VGG weights).
It is trained on public data only, then frozen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .unet import Downsample, SelfAttention, Upsample, _norm


class AEResBlock(nn.Module):
    """Pre-activation residual block without a time embedding."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Encoder(nn.Module):
    def __init__(self, channels: int, width: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                 attn_resolutions: set[int], resolution: int, z_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(channels, width * ch_mult[0], 3, padding=1)
        layers, ch, res = [], width * ch_mult[0], resolution
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                layers.append(AEResBlock(ch, width * mult))
                ch = width * mult
                if res in attn_resolutions:
                    layers.append(SelfAttention(ch))
            if level < len(ch_mult) - 1:
                layers.append(Downsample(ch))
                res = (res + 1) // 2
        self.down = nn.Sequential(*layers)
        self.mid = nn.Sequential(AEResBlock(ch, ch), SelfAttention(ch), AEResBlock(ch, ch))
        self.norm_out = _norm(ch)
        self.conv_out = nn.Conv2d(ch, 2 * z_channels, 3, padding=1)  # "double_z": mean and log-variance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, channels: int, width: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                 attn_resolutions: set[int], resolution: int, z_channels: int):
        super().__init__()
        ch = width * ch_mult[-1]
        res = resolution
        for _ in range(len(ch_mult) - 1):
            res = (res + 1) // 2
        self.conv_in = nn.Conv2d(z_channels, ch, 3, padding=1)
        self.mid = nn.Sequential(AEResBlock(ch, ch), SelfAttention(ch), AEResBlock(ch, ch))
        layers = []
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                layers.append(AEResBlock(ch, width * mult))
                ch = width * mult
                if res in attn_resolutions:
                    layers.append(SelfAttention(ch))
            if level > 0:
                layers.append(Upsample(ch))
                res *= 2
        self.up = nn.Sequential(*layers)
        self.norm_out = _norm(ch)
        self.conv_out = nn.Conv2d(ch, channels, 3, padding=1)
        self.resolution = resolution

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        if h.shape[-1] != self.resolution:  # odd sizes: the downsampling rounded up
            h = h[..., :self.resolution, :self.resolution]
        return self.conv_out(F.silu(self.norm_out(h)))


class KLAutoencoder(nn.Module):
    """x in [-1, 1] -> posterior moments (2 * z_channels maps) -> reconstruction."""

    def __init__(self, *, channels: int, resolution: int, width: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                 attn_resolutions: tuple[int, ...], z_channels: int, kl_weight: float):
        super().__init__()
        attn = set(attn_resolutions)
        self.z_channels, self.kl_weight = z_channels, kl_weight
        self.encoder = Encoder(channels, width, ch_mult, num_res_blocks, attn, resolution, z_channels)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * z_channels, 1)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 1)
        self.decoder = Decoder(channels, width, ch_mult, num_res_blocks, attn, resolution, z_channels)

    def moments(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    @staticmethod
    def split(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    @classmethod
    def sample_latent(cls, moments: torch.Tensor) -> torch.Tensor:
        mean, logvar = cls.split(moments)
        return mean + (0.5 * logvar).exp() * torch.randn_like(mean)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-image loss: L1 reconstruction + kl_weight * KL, both summed over pixels, divided
        by the image's pixel count. x is in [-1, 1]."""
        moments = self.moments(x)
        mean, logvar = self.split(moments)
        recon = self.decode(mean + (0.5 * logvar).exp() * torch.randn_like(mean))
        rec = (recon - x).abs().flatten(1).sum(dim=1)
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1.0 - logvar).flatten(1).sum(dim=1)
        return (rec + self.kl_weight * kl) / x[0].numel()
