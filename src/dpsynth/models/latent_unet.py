"""The latent diffusion U-Net of DP-LDM and DP-LoRA: residual blocks conditioned on the
diffusion time, and SpatialTransformer blocks (self-attention, cross-attention to the class
embedding, a GEGLU feed-forward) at the levels in `attn_levels`, as in the LDM code's
`openaimodel.UNetModel` with `SpatialTransformer` conditioning (Rombach et al., 2022).

Attention is written with Linear layers on (B, T, C) tensors (`to_q`, `to_k`, `to_v`,
`to_out.0`, the LDM names, so LoRA targets read as in DPImageBench's config), never
nn.MultiheadAttention: opacus computes per-sample gradients for every layer here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .unet import Downsample, NoiseEmbedding, ResBlock, Upsample, _norm


class CrossAttention(nn.Module):
    """Multi-head attention of `query_dim` tokens over `context_dim` tokens (self-attention
    when no context is given). q, k, v are bias-free as in the LDM code."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.scale = heads, dim_head ** -0.5
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, _ = x.shape
        h = self.heads

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, T, h*d) -> (B, h, T, d)
            return t.reshape(b, t.shape[1], h, -1).transpose(1, 2)

        q, k, v = heads(self.to_q(x)), heads(self.to_k(context)), heads(self.to_v(context))
        attn = torch.softmax(q @ k.transpose(-1, -2) * self.scale, dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out)


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads, dim_head)                   # self-attention
        self.ff = nn.Sequential(GEGLU(dim, 4 * dim), nn.Linear(4 * dim, dim))
        self.attn2 = CrossAttention(dim, heads, dim_head, context_dim)      # to the class embedding
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """GroupNorm, 1x1 projection in, `depth` transformer blocks over the pixels, 1x1
    projection out (zero-initialised: the block starts as the identity), residual."""

    def __init__(self, channels: int, head_channels: int, context_dim: int, depth: int = 1):
        super().__init__()
        heads = max(1, channels // head_channels)
        self.norm = _norm(channels)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(channels, heads, channels // heads, context_dim) for _ in range(depth))
        self.proj_out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x)).reshape(b, c, h * w).transpose(1, 2)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        # contiguous: opacus 1.6's Conv2d grad sampler is wrong on the strided view a transpose gives
        return x + self.proj_out(tokens.transpose(1, 2).reshape(b, c, h, w).contiguous())


class LatentUNet(nn.Module):
    """eps_theta(z_t, t, context): the noise in a noisy latent. `attn_levels` are
    downsampling factors inside the U-Net (1: the latent resolution), as DPImageBench's
    `attention_resolutions`."""

    def __init__(self, *, channels: int, width: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                 attn_levels: tuple[int, ...], head_channels: int, context_dim: int, depth: int = 1,
                 dropout: float = 0.0):
        super().__init__()
        emb_dim = 4 * width
        self.time_features = NoiseEmbedding(width)
        self.emb_fc1, self.emb_fc2 = nn.Linear(width, emb_dim), nn.Linear(emb_dim, emb_dim)
        self.conv_in = nn.Conv2d(channels, width * ch_mult[0], 3, padding=1)

        def transformer(ch: int) -> SpatialTransformer:
            return SpatialTransformer(ch, head_channels, context_dim, depth)

        ch, ds, skips = width * ch_mult[0], 1, [width * ch_mult[0]]
        self.down = nn.ModuleList()
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                block = nn.ModuleList([ResBlock(ch, width * mult, emb_dim, dropout)])
                ch = width * mult
                if ds in attn_levels:
                    block.append(transformer(ch))
                self.down.append(block)
                skips.append(ch)
            if level < len(ch_mult) - 1:
                self.down.append(nn.ModuleList([Downsample(ch)]))
                skips.append(ch)
                ds *= 2
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, dropout), transformer(ch),
                                  ResBlock(ch, ch, emb_dim, dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                block = nn.ModuleList([ResBlock(ch + skips.pop(), width * mult, emb_dim, dropout)])
                ch = width * mult
                if ds in attn_levels:
                    block.append(transformer(ch))
                self.up.append(block)
            if level > 0:
                self.up.append(nn.ModuleList([Upsample(ch)]))
                ds //= 2
        self.norm_out = _norm(ch)
        self.conv_out = nn.Conv2d(ch, channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _run_layer(self, layer: nn.Module, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if isinstance(layer, ResBlock):
            return layer(h, emb)
        if isinstance(layer, SpatialTransformer):
            return layer(h, context)
        return layer(h)

    def forward(self, z: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # NoiseEmbedding multiplies by 1000: t / 1000 gives the DDPM sinusoidal embedding of t.
        emb = F.silu(self.emb_fc2(F.silu(self.emb_fc1(self.time_features(t.float() / 1000.0)))))
        h = self.conv_in(z)
        hs = [h]
        for block in self.down:
            for layer in block:
                h = self._run_layer(layer, h, emb, context)
            hs.append(h)
        for layer in self.mid:
            h = self._run_layer(layer, h, emb, context)
        for block in self.up:
            for i, layer in enumerate(block):
                if i == 0 and isinstance(layer, ResBlock):
                    if h.shape[-1] != hs[-1].shape[-1]:  # odd latent sizes (7 -> 4 -> 8): crop to the skip
                        h = h[..., :hs[-1].shape[-2], :hs[-1].shape[-1]]
                    h = torch.cat([h, hs.pop()], dim=1)
                h = self._run_layer(layer, h, emb, context)
        return self.conv_out(F.silu(self.norm_out(h)))
