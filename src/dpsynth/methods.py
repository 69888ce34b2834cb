"""Method registry: a name -> method class dict, one constructor shape for all.

A method says which stages it uses and builds its generator. Later method families
(diffusion, GANs, mean embeddings) register here the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import BadInput
from .models.cvae import ConditionalVAE, CVAEConfig


@dataclass
class Method:
    """Base class; subclasses set the class attributes and `build_generator`."""

    name: str = ""
    uses_public_selection: bool = False
    uses_pretraining: bool = False
    description: str = ""
    generator_options: dict = field(default_factory=dict)

    def build_generator(self, resolution: int, channels: int, num_classes: int) -> nn.Module:
        raise NotImplementedError

    @staticmethod
    def per_sample_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return model(x.float() / 255.0 if x.dtype == torch.uint8 else x, y)


class PrivImageCVAE(Method):
    """PrivImage's recipe (semantic query -> pretrain on the selected public subset -> DP-SGD)
    on a class-conditional VAE backbone: the pipeline's default, fast on a CPU."""

    def __init__(self, **generator_options):
        super().__init__(name="privimage-cvae", uses_public_selection=True, uses_pretraining=True,
                         description="semantic query + public pretraining + DP-SGD on a conditional VAE",
                         generator_options=generator_options)

    def build_generator(self, resolution, channels, num_classes):
        return ConditionalVAE(CVAEConfig(resolution=resolution, channels=channels, num_classes=num_classes,
                                         **self.generator_options))


class DPCVAE(PrivImageCVAE):
    """DP-SGD on the conditional VAE from scratch: no public data."""

    def __init__(self, **generator_options):
        super().__init__(**generator_options)
        self.name, self.uses_public_selection, self.uses_pretraining = "dp-cvae", False, False
        self.description = "DP-SGD on a conditional VAE, no public data"


class PDPCVAE(PrivImageCVAE):
    """Pretrain on the whole public set (PDP-Diffusion's recipe), then DP-SGD."""

    def __init__(self, **generator_options):
        super().__init__(**generator_options)
        self.name, self.uses_public_selection = "pdp-cvae", False
        self.description = "public pretraining on the whole public set + DP-SGD on a conditional VAE"


METHODS: dict[str, type[Method]] = {}


def register_method(name: str, cls: type[Method]) -> None:
    if name in METHODS:
        raise ValueError(f"method {name!r} is already registered")
    METHODS[name] = cls


for _name, _cls in (("privimage-cvae", PrivImageCVAE), ("dp-cvae", DPCVAE), ("pdp-cvae", PDPCVAE)):
    register_method(_name, _cls)


def get_method(name: str, **generator_options) -> Method:
    cls = METHODS.get(name)
    if cls is None:
        raise BadInput(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    return cls(**generator_options)
