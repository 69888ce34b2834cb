"""Which torch device a stage trains or samples on."""

from __future__ import annotations

import torch

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
