"""DP-LoRA as DPImageBench runs it (models/DP_LORA): the DP-LDM backbone pretrained on public
data, LoRA adapters (peft) on the U-Net's attention, the class embedder trainable, everything
else frozen.

The adapters sit on q, k, v AND the output projection of every attention (self and cross).
DPImageBench's config names the output projection "to_out.Linear", which matches no module
(its key is `to_out.0`), so its runs adapt q, k, v only; dpsynth targets `to_out.0`.
peft freezes every base weight; bias="none" (DPImageBench's "lora_only" trains no bias
there, since q, k, v have none). Noise multiplicity K (DPImageBench: 8): each example's loss
is averaged over K draws of (t, noise) BEFORE its gradient is clipped (training.dpsgd), so
one example is still one clipped gradient.
"""

from __future__ import annotations

from dataclasses import replace

from ...models.ldm import add_lora
from ..registry import register_method
from .common import LatentDiffusionMethod, check_train_int, check_train_number, freeze_all_but


class DPLoRA(LatentDiffusionMethod):
    """AdamW at 4096 x 1e-6 without a scheduler in DPImageBench; Adam at that rate here."""

    name = "dp-lora"
    description = "DP-LoRA: public-pretrained latent diffusion; DP-SGD on LoRA adapters of its attention"
    finetune_defaults = {"epochs": 2, "batch_size": 4096, "clip": 1e-3, "lr": 4.096e-3, "grad_sample_mode": "bk",
                         "noise_multiplicity": 8, "physical_batch_size": 128, "ema": None,
                         "private_optimizer": "dpsgd", "feedback_clip": None,
                         "train_opts": {"lora_rank": 8, "lora_alpha": 8.0}}

    def prepare_private(self, generator, opts):
        rank = check_train_int("lora_rank", opts.train_opts["lora_rank"], 1)
        alpha = check_train_number("lora_alpha", opts.train_opts["lora_alpha"])
        if generator.cfg.lora_rank:  # already adapted (never from pretrain): keep its adapters
            raise RuntimeError("the pretrained generator already carries LoRA adapters")
        add_lora(generator.unet, rank, alpha)
        generator.cfg = replace(generator.cfg, lora_rank=rank, lora_alpha=alpha)  # generate rebuilds them
        adapters = [p for n, p in generator.unet.named_parameters() if ".lora_" in n]
        return freeze_all_but(generator, [*adapters, *generator.class_embed.parameters()])

register_method(DPLoRA)
