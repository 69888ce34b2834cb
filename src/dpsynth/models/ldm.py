"""Class-conditional latent diffusion (Rombach et al., 2022) as DP-LDM and DP-LoRA run it in
DPImageBench: a KL autoencoder (f = 2), a DDPM on its latents (T = 1000, the LDM "linear"
beta schedule from 0.0015 to 0.0155, epsilon prediction, L2 loss), the class label fed to
the U-Net's cross-attention through a class embedder (nn.Embedding, one row per class plus
the null label), and a DDIM sampler (eta = 1 by default, as DPImageBench samples).

`forward(x, labels)` is the per-sample training loss (the contract of every dpsynth
generator). `x` is either uint8 images, encoded here with the frozen autoencoder, or the
float posterior moments `encode_moments` already gave for them (the DP trainer encodes the
sensitive set once: a per-image, public function, so each row still depends on one image).
The latent is then sampled from the posterior and scaled by `latent_scale`, a buffer set at
pretraining from public latents (1 / their standard deviation, the LDM's scale_by_std).

`lora_rank > 0` puts LoRA adapters (peft) on the q, k, v and output projections of every
attention in the U-Net; the config records rank and alpha so that the released generator
is rebuilt with the same adapters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import BadInput
from .autoencoder import KLAutoencoder
from .latent_unet import LatentUNet

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # to_out.0: the Linear inside to_out = Sequential(Linear, Dropout)


def _tuple(value) -> tuple[int, ...]:
    return tuple(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))


@dataclass(frozen=True)
class LatentDiffusionConfig:
    resolution: int = 28
    channels: int = 1
    num_classes: int = 10
    # autoencoder (DPImageBench: ch 128, ch_mult [1, 2], 2 res blocks, attention at 14 and 7 / 16 and 8)
    ae_width: int = 128
    ae_ch_mult: tuple[int, ...] = (1, 2)
    ae_res_blocks: int = 2
    ae_attn_resolutions: tuple[int, ...] = (-1,)   # -1: half the input resolution (the latent's)
    z_channels: int = 3
    kl_weight: float = 1e-6
    # latent U-Net (DPImageBench 28 px: 64, [1, 2], attention at 1 and 2, head channels 8)
    width: int = 64
    ch_mult: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 2
    attn_levels: tuple[int, ...] = (1, 2)
    head_channels: int = 8
    context_dim: int = 512
    transformer_depth: int = 1
    dropout: float = 0.0
    # DDPM
    timesteps: int = 1000
    beta_start: float = 0.0015
    beta_end: float = 0.0155
    label_dropout: float = 0.0     # > 0 trains the null label too, for classifier-free guidance
    # LoRA (set by DP-LoRA's finetune, not by --arch)
    lora_rank: int = 0
    lora_alpha: float = 8.0

    def __post_init__(self) -> None:
        for name in ("ae_ch_mult", "ae_attn_resolutions", "ch_mult", "attn_levels"):
            object.__setattr__(self, name, _tuple(getattr(self, name)))
        for name in ("ae_width", "width"):
            if getattr(self, name) < 4 or getattr(self, name) % 4:
                raise BadInput(f"model {name} {getattr(self, name)} must be a multiple of 4 and >= 4 (GroupNorm groups)")
        for name in ("ae_ch_mult", "ch_mult"):
            if not getattr(self, name) or min(getattr(self, name)) < 1:
                raise BadInput(f"model {name} {list(getattr(self, name))} must be a non-empty list of integers >= 1")
        for name in ("ae_res_blocks", "num_res_blocks", "z_channels", "head_channels", "context_dim",
                     "transformer_depth", "timesteps"):
            if int(getattr(self, name)) < 1:
                raise BadInput(f"model {name} {getattr(self, name)} must be an integer >= 1")
        if not (0 < self.beta_start < self.beta_end < 1):
            raise BadInput(f"model beta_start {self.beta_start} and beta_end {self.beta_end} must satisfy "
                           f"0 < beta_start < beta_end < 1")
        if not (0.0 <= self.label_dropout < 1.0):
            raise BadInput(f"model label_dropout {self.label_dropout} must be in [0, 1)")
        if not (0.0 <= self.dropout < 1.0):
            raise BadInput(f"model dropout {self.dropout} must be in [0, 1)")
        if self.lora_rank < 0 or self.lora_alpha <= 0:
            raise BadInput(f"lora_rank {self.lora_rank} must be >= 0 and lora_alpha {self.lora_alpha} > 0")

    @property
    def latent_resolution(self) -> int:
        res = self.resolution
        for _ in range(len(self.ae_ch_mult) - 1):
            res = (res + 1) // 2
        return res

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in ("ae_ch_mult", "ae_attn_resolutions", "ch_mult", "attn_levels"):
            d[name] = list(d[name])
        return d


class LatentDiffusion(nn.Module):
    def __init__(self, cfg: LatentDiffusionConfig):
        super().__init__()
        self.cfg = cfg
        latent = cfg.latent_resolution
        attn = tuple(latent if a == -1 else a for a in cfg.ae_attn_resolutions)
        self.autoencoder = KLAutoencoder(channels=cfg.channels, resolution=cfg.resolution, width=cfg.ae_width,
                                         ch_mult=cfg.ae_ch_mult, num_res_blocks=cfg.ae_res_blocks,
                                         attn_resolutions=attn, z_channels=cfg.z_channels, kl_weight=cfg.kl_weight)
        self.unet = LatentUNet(channels=cfg.z_channels, width=cfg.width, ch_mult=cfg.ch_mult,
                               num_res_blocks=cfg.num_res_blocks, attn_levels=cfg.attn_levels,
                               head_channels=cfg.head_channels, context_dim=cfg.context_dim,
                               depth=cfg.transformer_depth, dropout=cfg.dropout)
        self.class_embed = nn.Embedding(cfg.num_classes + 1, cfg.context_dim)  # the last row: null label
        self.register_buffer("latent_scale", torch.ones(()))
        betas = torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, cfg.timesteps, dtype=torch.float64) ** 2
        self.register_buffer("alphas_cumprod", torch.cumprod(1.0 - betas, 0), persistent=False)
        if cfg.lora_rank:
            add_lora(self.unet, cfg.lora_rank, cfg.lora_alpha)

    # ---- the autoencoder ------------------------------------------------------------------------
    @staticmethod
    def to_model_range(x: torch.Tensor) -> torch.Tensor:
        return x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """uint8 images -> posterior moments (float, 2 * z_channels maps), in batches, no grad."""
        device = self.latent_scale.device
        out = [self.autoencoder.moments(self.to_model_range(images[i:i + batch_size].to(device))).cpu()
               for i in range(0, len(images), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, 2 * self.cfg.z_channels, self.cfg.latent_resolution,
                                                      self.cfg.latent_resolution)

    def autoencoder_loss(self, x: torch.Tensor) -> torch.Tensor:
        return self.autoencoder(self.to_model_range(x))

    @torch.no_grad()
    def set_latent_scale(self, moments: torch.Tensor) -> float:
        """1 / std of latents sampled from these (public) posteriors: unit-variance latents."""
        z = KLAutoencoder.sample_latent(moments.float())
        self.latent_scale.fill_(1.0 / float(z.std().clamp_min(1e-6)))
        return float(self.latent_scale)

    # ---- the diffusion model --------------------------------------------------------------------
    def context(self, labels: torch.Tensor) -> torch.Tensor:
        return self.class_embed(labels)[:, None, :]  # one context token per image

    def forward(self, x: torch.Tensor, labels: torch.Tensor, t: torch.Tensor | None = None,
                noise: torch.Tensor | None = None, posterior_noise: torch.Tensor | None = None) -> torch.Tensor:
        """Per-row DDPM loss: mean squared error of the predicted latent noise. t, the noise and
        the posterior draw are random per row unless given (tests pass fixed draws)."""
        if x.dtype == torch.uint8:
            with torch.no_grad():
                x = self.autoencoder.moments(self.to_model_range(x))
        mean, logvar = KLAutoencoder.split(x.detach())
        eps = torch.randn_like(mean) if posterior_noise is None else posterior_noise
        z0 = (mean + (0.5 * logvar).exp() * eps) * self.latent_scale
        n = z0.shape[0]
        if t is None:
            t = torch.randint(0, self.cfg.timesteps, (n,), device=z0.device)
        if self.cfg.label_dropout > 0 and self.training:
            drop = torch.rand(n, device=z0.device) < self.cfg.label_dropout
            labels = torch.where(drop, torch.full_like(labels, self.cfg.num_classes), labels)
        noise = torch.randn_like(z0) if noise is None else noise
        abar = self.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
        zt = abar.sqrt() * z0 + (1.0 - abar).sqrt() * noise
        err = (self.unet(zt, t, self.context(labels)) - noise) ** 2
        return err.flatten(1).mean(dim=1)

    def _eps(self, z: torch.Tensor, t: int, labels: torch.Tensor, guidance: float) -> torch.Tensor:
        ts = torch.full((z.shape[0],), t, device=z.device, dtype=torch.long)
        cond = self.unet(z, ts, self.context(labels))
        if guidance == 0.0:
            return cond
        uncond = self.unet(z, ts, self.context(torch.full_like(labels, self.cfg.num_classes)))
        return cond + guidance * (cond - uncond)

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, generator: torch.Generator | None = None, steps: int = 200,
               guidance: float = 0.0, eta: float = 1.0) -> torch.Tensor:
        """DDIM (Song et al., 2021) on `steps` uniformly spaced timesteps, eta = 1 (ancestral
        noise, DPImageBench's setting); then the autoencoder decodes. Returns uint8 images."""
        if not (2 <= steps <= self.cfg.timesteps):
            raise BadInput(f"steps={steps} must be between 2 and the model's {self.cfg.timesteps} timesteps")
        device = self.latent_scale.device
        c = self.cfg
        times = torch.linspace(0, c.timesteps - 1, steps).round().long().tolist()
        shape = (len(labels), c.z_channels, c.latent_resolution, c.latent_resolution)
        z = torch.randn(shape, generator=generator).to(device)
        labels = labels.to(device)
        abar = self.alphas_cumprod.to(device)
        for i in reversed(range(steps)):
            t = times[i]
            a_t = abar[t]
            a_prev = abar[times[i - 1]] if i > 0 else torch.ones((), dtype=abar.dtype, device=device)
            eps = self._eps(z, t, labels, guidance).double()
            z0 = (z.double() - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
            z = a_prev.sqrt() * z0 + (1 - a_prev - sigma ** 2).clamp_min(0).sqrt() * eps
            if i > 0 and eta > 0:
                z = z + sigma * torch.randn(shape, generator=generator).to(device, torch.float64)
            z = z.float()
        images = self.autoencoder.decode(z / self.latent_scale)
        return ((images.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).cpu()


def add_lora(unet: nn.Module, rank: int, alpha: float) -> None:
    """peft's LoRA on the q, k, v and output projections of every attention (in place). peft
    freezes every other parameter of `unet`; A ~ N(0, 1/r), B = 0 ("gaussian" init, as
    DPImageBench), so the adapted model starts as the pretrained one."""
    from peft import LoraConfig, inject_adapter_in_model  # imported here: peft pulls in transformers

    config = LoraConfig(r=int(rank), lora_alpha=float(alpha), target_modules=list(LORA_TARGETS),
                        init_lora_weights="gaussian", lora_dropout=0.0, bias="none")
    inject_adapter_in_model(config, unet)
