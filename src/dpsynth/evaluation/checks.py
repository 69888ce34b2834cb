"""Argument checks shared by the utility and fidelity evaluators.

They look only at metadata (dtype, shape, length) unless told to read label
values, so calling them on the real test set never reads its contents.
"""

from __future__ import annotations

import torch

from dpsynth.errors import BadInput


def check_images(images: object, what: str) -> torch.Tensor:
    """A non-empty uint8 tensor (N, C, H, W) with C in {1, 3}."""
    if not isinstance(images, torch.Tensor):
        raise BadInput(f"{what} must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise BadInput(f"{what} must have dtype uint8, got {images.dtype}")
    if images.dim() != 4:
        raise BadInput(f"{what} must have shape (N, C, H, W), got {tuple(images.shape)}")
    if images.shape[1] not in (1, 3):
        raise BadInput(f"{what} must have 1 or 3 channels, got {images.shape[1]}")
    if images.shape[0] == 0:
        raise BadInput(f"{what} is empty; at least one image is required")
    return images


def check_labels(labels: object, n: int, what: str) -> torch.Tensor:
    """An integer tensor (N,) matching the image count; values are checked separately."""
    if not isinstance(labels, torch.Tensor):
        raise BadInput(f"{what} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise BadInput(f"{what} must have an integer dtype, got {labels.dtype}")
    if labels.dim() != 1:
        raise BadInput(f"{what} must have shape (N,), got {tuple(labels.shape)}")
    if labels.shape[0] != n:
        raise BadInput(f"{what} has {labels.shape[0]} entries but there are {n} images")
    return labels


def check_label_values(labels: torch.Tensor, num_classes: int, what: str) -> None:
    """Every label in [0, num_classes)."""
    if labels.numel() == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise BadInput(f"{what} contains label {bad}; allowed labels are 0..{num_classes - 1}")
