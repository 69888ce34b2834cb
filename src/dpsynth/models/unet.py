"""Class-conditional U-Net in the spirit of NCSN++ (Song et al.; the "song" network of EDM
that DPDM, PDP-Diffusion, PrivImage and DP-FETA train), reduced to what DP-SGD needs.

Only layers opacus computes per-sample gradients for: Conv2d, Linear (also on (B, T, C)
tensors, which is how attention is written here), GroupNorm and Embedding. No BatchNorm,
no nn.MultiheadAttention. Residual sums are scaled by 1/sqrt(2) as in NCSN++ ("skip
rescale"), which keeps activations in range when the model is trained with tiny clipping
norms. The defaults (width 36, ch_mult 2,2, two blocks per level, attention at half resolution)
give 1.84M parameters at 28x28x1 and at 32x32x3.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BadInput


@dataclass(frozen=True)
class UNetConfig:
    resolution: int = 28
    channels: int = 1
    num_classes: int = 10
    width: int = 36                              # nf: channels = width * ch_mult[level]; 1.84M params
    ch_mult: tuple[int, ...] = (2, 2)            # DPImageBench's 28/32 px setting
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = field(default=(-1,))  # -1: half the input resolution
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("ch_mult", "attn_resolutions"):  # a single number is a one-item list
            value = getattr(self, name)
            object.__setattr__(self, name, tuple(int(v) for v in (value if isinstance(value, (list, tuple)) else [value])))
        if self.width < 4 or self.width % 4:
            raise BadInput(f"model width {self.width} must be a multiple of 4 and >= 4 (GroupNorm groups)")
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise BadInput(f"model ch_mult {self.ch_mult} must be a non-empty list of integers >= 1")
        if self.resolution % (2 ** (len(self.ch_mult) - 1)):
            raise BadInput(f"resolution {self.resolution} must be divisible by 2^{len(self.ch_mult) - 1} "
                           f"for ch_mult {list(self.ch_mult)}")
        if self.num_res_blocks < 1:
            raise BadInput(f"model num_res_blocks {self.num_res_blocks} must be >= 1")
        if not (0.0 <= self.dropout < 1.0):
            raise BadInput(f"model dropout {self.dropout} must be in [0, 1)")

    @property
    def attention_at(self) -> set[int]:
        return {self.resolution // 2 if a == -1 else a for a in self.attn_resolutions}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ch_mult"], d["attn_resolutions"] = list(self.ch_mult), list(self.attn_resolutions)
        return d


def _norm(channels: int) -> nn.GroupNorm:
    groups = max(1, min(32, channels // 4))
    while channels % groups:  # the largest group count <= 32 that divides the channels
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity: stable early DP steps
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.skip(x) + h) / math.sqrt(2.0)


class SelfAttention(nn.Module):
    """Single-head self-attention over pixels, with Linear projections on (B, HW, C)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).reshape(b, c, h * w).transpose(1, 2)
        q, k, v = self.qkv(tokens).chunk(3, dim=2)
        if torch.is_grad_enabled():
            # Training: functorch has no batching rule for the fused CPU kernel (vmap mode ran
            # 1.6x -> 2.2x of the plain step with it), and at physical batches of 64 the weights
            # fit in cache. Scaling q, not the (HW x HW) weights, divides 1/HW as many numbers.
            attn = torch.softmax((q * (1.0 / math.sqrt(c))) @ k.transpose(1, 2), dim=-1)
            mixed = attn @ v
        else:
            # Sampling, at batches of 1,000: the fused kernel never materialises the weights,
            # whose writing and soft-maxing were ~40% of the width-8 U-Net's forward on the CPU.
            mixed = F.scaled_dot_product_attention(q, k, v)
        out = self.proj(mixed).transpose(1, 2).reshape(b, c, h, w)
        return (x + out) / math.sqrt(2.0)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class NoiseEmbedding(nn.Module):
    """Fixed sinusoidal features of the noise level (no parameters)."""

    def __init__(self, dim: int):
        super().__init__()
        half = dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(10000.0) * torch.arange(half) / half), persistent=False)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        angles = c_noise[:, None].float() * 1000.0 * self.freqs[None]  # c_noise ~ ln(sigma)/4, small
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class ConditionalUNet(nn.Module):
    """F(x, c_noise, label) -> tensor shaped like x. Label `num_classes` is the null label
    used for classifier-free guidance."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        nf, emb_dim = cfg.width, 4 * cfg.width
        self.noise_features = NoiseEmbedding(nf)
        self.emb_fc1, self.emb_fc2 = nn.Linear(nf, emb_dim), nn.Linear(emb_dim, emb_dim)
        self.label_emb = nn.Embedding(cfg.num_classes + 1, emb_dim)
        self.conv_in = nn.Conv2d(cfg.channels, nf * cfg.ch_mult[0], 3, padding=1)

        self.down = nn.ModuleList()
        skips = [nf * cfg.ch_mult[0]]
        ch, res = nf * cfg.ch_mult[0], cfg.resolution
        for level, mult in enumerate(cfg.ch_mult):
            for _ in range(cfg.num_res_blocks):
                block = nn.ModuleList([ResBlock(ch, nf * mult, emb_dim, cfg.dropout)])
                ch = nf * mult
                if res in cfg.attention_at:
                    block.append(SelfAttention(ch))
                self.down.append(block)
                skips.append(ch)
            if level < len(cfg.ch_mult) - 1:
                self.down.append(nn.ModuleList([Downsample(ch)]))
                skips.append(ch)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, cfg.dropout), SelfAttention(ch),
                                  ResBlock(ch, ch, emb_dim, cfg.dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.ch_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                block = nn.ModuleList([ResBlock(ch + skips.pop(), nf * mult, emb_dim, cfg.dropout)])
                ch = nf * mult
                if res in cfg.attention_at:
                    block.append(SelfAttention(ch))
                self.up.append(block)
            if level > 0:
                self.up.append(nn.ModuleList([Upsample(ch)]))
                res *= 2
        self.norm_out = _norm(ch)
        self.conv_out = nn.Conv2d(ch, cfg.channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        emb = self.emb_fc2(F.silu(self.emb_fc1(self.noise_features(c_noise))))
        emb = F.silu(emb + self.label_emb(labels))
        h = self.conv_in(x)
        hs = [h]
        for block in self.down:
            for layer in block:
                h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, emb)), emb)
        for block in self.up:
            for layer in block:
                if isinstance(layer, ResBlock):
                    h = layer(torch.cat([h, hs.pop()], dim=1), emb)
                else:
                    h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))
