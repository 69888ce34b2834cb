"""DP-LDM (Liu et al., TMLR 2024) as DPImageBench runs it, and its pixel-space variant.

- `dp-ldm`: DP-SGD trains only the U-Net's SpatialTransformer blocks (DPImageBench's
  `train_condition_only`) and the class embedder; the autoencoder and every residual block,
  convolution and time embedding stay frozen. `frozen_transformers` keeps the first N
  transformers (in module order: down, middle, up) frozen too, as DPImageBench's
  `ablation_blocks` = N + 1 does (its 32 px configs train the last 8 of 16).
- `dp-ldm-sd`: what DPImageBench calls DP-LDM (SD), the PDP-Diffusion setting with
  `partly_finetune`: dpsynth's pixel-space EDM U-Net pretrained on public data, of which
  DP-SGD trains only the attention projections (qkv, proj) and the label and time
  embeddings. Not Stable Diffusion.
"""

from __future__ import annotations

from ...errors import BadInput
from ...models.edm import EDMDiffusion
from ...models.latent_unet import SpatialTransformer
from ...models.unet import SelfAttention
from ..diffusion import DiffusionMethod
from ..registry import register_method
from .common import LatentDiffusionMethod, check_train_int, freeze_all_but


class DPLDM(LatentDiffusionMethod):
    """Adam at 4e-4, constant: DPImageBench's AdamW reaches 4096 x 1e-6 only after a 10k-step
    linear warm-up that its ~2k-step run never finishes; 4e-4 is that ramp's mean over the run."""

    name = "dp-ldm"
    description = "DP-LDM: public-pretrained latent diffusion; DP-SGD on its attention blocks and class embedder"
    finetune_defaults = {"epochs": 2, "batch_size": 4096, "clip": 1e-3, "lr": 4e-4, "grad_sample_mode": "bk",
                         "noise_multiplicity": 1, "physical_batch_size": 512, "ema": None,
                         "private_optimizer": "dpsgd", "feedback_clip": None,
                         "train_opts": {"frozen_transformers": 0}}

    def private_parameters(self, generator, opts):
        frozen = check_train_int("frozen_transformers", opts.train_opts["frozen_transformers"], 0)
        blocks = [m for m in generator.unet.modules() if isinstance(m, SpatialTransformer)]
        if frozen >= len(blocks):
            raise BadInput(f"`train_opts` frozen_transformers={frozen} must be below the U-Net's {len(blocks)} "
                           f"transformers")
        params = [p for block in blocks[frozen:] for p in block.parameters()]
        return [*params, *generator.class_embed.parameters()]


class DPLDMSD(DiffusionMethod):
    name = "dp-ldm-sd"
    description = "DP-LDM (SD): public-pretrained pixel EDM U-Net; DP-SGD on attention projections and embeddings"
    uses_pretraining = True

    def prepare_private(self, generator: EDMDiffusion, opts):
        net = generator.net
        keep = [*net.label_emb.parameters(), *net.emb_fc1.parameters(), *net.emb_fc2.parameters()]
        for module in net.modules():
            if isinstance(module, SelfAttention):  # its projections; its GroupNorm stays frozen
                keep += [*module.qkv.parameters(), *module.proj.parameters()]
        return freeze_all_but(generator, keep)


for _cls in (DPLDM, DPLDMSD):
    register_method(_cls)
