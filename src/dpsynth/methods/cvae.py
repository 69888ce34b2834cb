"""The conditional-VAE methods: fast on a CPU, one loss, one decoder pass."""

from __future__ import annotations

import torch

from ..models.cvae import ConditionalVAE, CVAEConfig
from .base import Method
from .registry import register_method


class CVAEMethod(Method):
    """Shared by the conditional-VAE methods: fast on a CPU, one loss, one decoder pass."""

    config_class, model_class = CVAEConfig, ConditionalVAE

    @staticmethod
    def per_sample_loss(model, x, y):
        return model(x.float() / 255.0 if x.dtype == torch.uint8 else x, y)


class PrivImageCVAE(CVAEMethod):
    name = "privimage-cvae"
    description = "semantic query + public pretraining + DP-SGD on a conditional VAE (CPU default)"
    uses_public_selection = uses_pretraining = True


class DPCVAE(CVAEMethod):
    name = "dp-cvae"
    description = "DP-SGD on a conditional VAE, no public data"


class PDPCVAE(CVAEMethod):
    name = "pdp-cvae"
    description = "public pretraining on the whole public set + DP-SGD on a conditional VAE"
    uses_pretraining = True


for _cls in (PrivImageCVAE, DPCVAE, PDPCVAE):
    register_method(_cls)
