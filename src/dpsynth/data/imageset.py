"""The in-memory dataset type every loader returns, plus pixel-level helpers.

Everything downstream (training, evaluation, the keyed tags in the run manifest)
sees one representation: uint8 NCHW tensors and int64 labels. Keeping pixels as
uint8 means digests are exact and memory stays 4x smaller than float.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dpsynth.errors import BadInput

# ITU-R BT.601 luma weights: the conventional RGB -> grey conversion (PIL's "L" uses them too).
_LUMA = (0.299, 0.587, 0.114)
# Resize in chunks so a 60k-image float copy never sits in memory at once.
_CHUNK = 4096


# eq=False: dataclass equality would compare tensors elementwise and then fail on bool().
@dataclass(frozen=True, eq=False)
class ImageSet:
    images: torch.Tensor  # uint8 (N, C, H, W), contiguous
    labels: torch.Tensor | None  # int64 (N,), values in [0, num_classes)
    num_classes: int  # 0 when unlabelled
    name: str  # registry name as given by the user
    split: str  # "train" or "test"
    source: str  # where the bytes came from, for logs and manifests
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Validate once here so every consumer can trust the invariants.
        im = self.images
        if im.dtype != torch.uint8 or im.dim() != 4:
            raise BadInput(
                f"dataset '{self.name}': images must be uint8 (N, C, H, W), got {im.dtype} {tuple(im.shape)}"
            )
        if not im.is_contiguous():
            object.__setattr__(self, "images", im.contiguous())
        if self.labels is None:
            if self.num_classes != 0:
                raise BadInput(f"dataset '{self.name}': num_classes={self.num_classes} but no labels; allowed: 0")
            return
        lab = self.labels
        if lab.dtype != torch.int64 or lab.shape != (im.shape[0],):
            raise BadInput(
                f"dataset '{self.name}': labels must be int64 of shape ({im.shape[0]},), "
                f"got {lab.dtype} {tuple(lab.shape)}"
            )
        if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= self.num_classes):
            raise BadInput(
                f"dataset '{self.name}': labels span [{int(lab.min())}, {int(lab.max())}]; "
                f"allowed [0, {self.num_classes - 1}]"
            )
        if not lab.is_contiguous():
            object.__setattr__(self, "labels", lab.contiguous())

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, indices) -> ImageSet:
        """Rows `indices` (tensor, array or list of ints, or a bool mask) as a new ImageSet."""
        idx = torch.as_tensor(np.asarray(indices) if not torch.is_tensor(indices) else indices)
        if idx.dtype != torch.bool:
            idx = idx.to(torch.int64)
        labels = None if self.labels is None else self.labels[idx].contiguous()
        return ImageSet(
            images=self.images[idx].contiguous(),
            labels=labels,
            num_classes=self.num_classes,
            name=self.name,
            split=self.split,
            source=self.source,
            class_names=self.class_names,
        )


def content_digest(images: ImageSet) -> str:
    """Plain sha256 over shape, pixel bytes and label bytes, for PUBLIC data (cache keys).

    Never write it for sensitive data: anyone holding the candidate images can recompute
    it. Sensitive sets get `dpsynth.data.keyed.keyed_tag` instead."""
    h = hashlib.sha256()
    h.update(("images:" + "x".join(str(d) for d in images.images.shape) + ";").encode())
    h.update(images.images.contiguous().numpy().tobytes())
    if images.labels is None:
        h.update(b"labels:none;")
    else:
        # Fixed little-endian int64 so the digest does not depend on the host.
        h.update(f"labels:{images.num_classes};".encode())
        h.update(images.labels.numpy().astype("<i8", copy=False).tobytes())
    return "sha256:" + h.hexdigest()


def resize_images(images: torch.Tensor, resolution: int, channels: int) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, channels, resolution, resolution).

    Bilinear with antialias (so downscaling averages rather than aliases);
    1 -> 3 channels by repetition, 3 -> 1 by ITU-R 601 luma.
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise BadInput(f"resize_images needs uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if not isinstance(resolution, int) or resolution < 1:
        raise BadInput(f"resolution {resolution!r} is invalid; allowed: a positive integer")
    if channels not in (1, 3):
        raise BadInput(f"channels {channels!r} is invalid; allowed: 1 or 3")
    c = images.shape[1]
    if c not in (1, 3):
        raise BadInput(f"images have {c} channels; only 1 or 3 can be converted")
    same_size = images.shape[2] == resolution and images.shape[3] == resolution
    if same_size and c == channels:
        return images.contiguous()
    out = []
    for start in range(0, images.shape[0], _CHUNK):
        x = images[start : start + _CHUNK].float()
        if c == 3 and channels == 1:  # reduce first: less work for the resize
            w = torch.tensor(_LUMA, dtype=x.dtype).view(1, 3, 1, 1)
            x = (x * w).sum(dim=1, keepdim=True)
        if not same_size:
            x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
        x = x.round_().clamp_(0, 255).to(torch.uint8)
        if c == 1 and channels == 3:  # expand last: repeat is exact on uint8
            x = x.expand(-1, 3, -1, -1)
        out.append(x)
    if not out:
        return torch.empty((0, channels, resolution, resolution), dtype=torch.uint8)
    return torch.cat(out).contiguous()
