"""Which torch device a stage trains or samples on."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import BadInput


def resolve_device(name: str | None) -> torch.device:
    """'auto' (default): the GPU when one is visible, else the CPU."""
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BadInput(f"device={name} asked for a GPU, but torch sees none; use `device` cpu or auto")
        return torch.device(name)
    raise BadInput(f"device={name!r} is unknown; choose auto, cpu or cuda[:N]")


def prefers_channels_last(model: nn.Module, device: torch.device) -> bool:
    """channels_last (NHWC) for a convolutional model on the GPU, where cuDNN's convolutions
    (tensor cores) run faster in it; on the CPU it is usually slower, so never there."""
    return device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules())
