"""Deterministic stratified train/validation split of the synthetic set."""

from __future__ import annotations

import torch

from dpsynth.errors import BadInput
from dpsynth.validation import check_fraction


def stratified_split(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index tensors (train, val): each class gives round(n_c * val_fraction) images to val.

    Stratifying keeps the validation class mix equal to the training one, so the
    checkpoint chosen on it is not biased toward whichever class happens to dominate.
    """
    check_fraction("val_fraction", val_fraction)
    gen = torch.Generator().manual_seed(seed)
    train_parts, val_parts = [], []
    for cls in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == cls, as_tuple=False).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        n_val = int(round(idx.numel() * val_fraction))
        val_parts.append(idx[:n_val])
        train_parts.append(idx[n_val:])
    train = torch.cat(train_parts)
    val = torch.cat(val_parts)
    if train.numel() == 0 or val.numel() == 0:
        raise BadInput(
            f"synthetic set of {labels.numel()} images is too small to split with "
            f"val_fraction={val_fraction}; both parts must be non-empty"
        )
    # Shuffle across classes so the result does not depend on class order downstream.
    train = train[torch.randperm(train.numel(), generator=gen)]
    val = val[torch.randperm(val.numel(), generator=gen)]
    return train, val
