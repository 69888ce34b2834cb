"""The EDM diffusion methods: DPDM, PDP-Diffusion, PrivImage, DP-FETA."""

from __future__ import annotations

from ..models.edm import EDMConfig, EDMDiffusion
from .base import Method
from .registry import register_method


class DiffusionMethod(Method):
    """The EDM diffusion family (DPDM, PDP-Diffusion, PrivImage, DP-FETA) on one U-Net.

    Defaults follow DPImageBench's configs for these methods (configs/<method>/
    fmnist_28_eps10.0.yaml): Adam 3e-4, clip 1e-3 (DPDM's small clipping norm), EMA 0.999,
    logical batch 4096; noise multiplicity 8 as PrivImage's paper (DPImageBench's configs
    use 32). Epochs default to a CPU-sized 2; recipes set the published 150.
    """

    config_class, model_class = EDMConfig, EDMDiffusion
    finetune_defaults = {"epochs": 2, "batch_size": 4096, "clip": 1e-3, "lr": 3e-4, "grad_sample_mode": "vmap",
                         "noise_multiplicity": 8, "physical_batch_size": 64, "ema": 0.999, "optimizer": "dpsgd",
                         "feedback_clip": None, "train_opts": {}}
    pretrain_defaults = {"epochs": 25, "batch_size": 64, "lr": 3e-4}
    sample_defaults = {"steps": 18, "guidance": 0.0}


class DPDM(DiffusionMethod):
    name = "dpdm"
    description = "DPDM: DP-SGD on an EDM diffusion model from scratch (no public data)"


class PDPDiffusion(DiffusionMethod):
    name = "pdp-diffusion"
    description = "PDP-Diffusion: pretrain on the whole public set, then DP-SGD"
    uses_pretraining = True


class PrivImage(DiffusionMethod):
    name = "privimage"
    description = "PrivImage: semantic query, pretrain on the selected public subset, then DP-SGD"
    uses_public_selection = uses_pretraining = True


class DPFETA(DiffusionMethod):
    name = "dp-feta"
    description = "DP-FETA: warm-up on DP central images (noisy class means), then DP-SGD"
    uses_central_warmup = True
    # DP-FETA's warm-up: 2000 steps of batch 50 on 50 central images, Adam 3e-4.
    pretrain_defaults = {"epochs": 2000, "batch_size": 50, "lr": 3e-4}


for _cls in (DPDM, PDPDiffusion, PrivImage, DPFETA):
    register_method(_cls)
