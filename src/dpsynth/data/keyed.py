"""Keyed values of a sensitive set: its integrity tag and 1-stable per-record membership.

Both are HMACs under the owner's key (`dpsynth.privacy.owner_key`), so nobody without the
key can compute them from candidate data.

Membership (for `--limit` and `--holdout`) is decided record by record: record i is in
iff u_i < fraction, where u_i is a uniform number read from HMAC(key, purpose, seed,
record bytes). No record's draw depends on any other record, so adding or removing one
image changes no other image's membership (the selection is 1-stable, and a DP guarantee
for the selected part carries over to the set the user passed). Shuffles and per-class
quotas are not: one more image re-deals thousands of others.
"""

from __future__ import annotations

import numpy as np
import torch

from ..privacy.owner_key import OwnerKey
from .imageset import ImageSet

TAG_PREFIX = "hmac-sha256:"


def keyed_tag(images: ImageSet, key: OwnerKey) -> str:
    """HMAC over shape, pixels and labels: identifies the exact data a run used, to the key's owner only."""
    shape = "x".join(str(d) for d in images.images.shape).encode()
    pixels = images.images.contiguous().numpy().tobytes()
    if images.labels is None:
        labels = b"none"
    else:  # fixed little-endian int64 so the tag does not depend on the host
        labels = f"{images.num_classes};".encode() + images.labels.numpy().astype("<i8", copy=False).tobytes()
    return TAG_PREFIX + key.mac(b"dataset-tag-v1", shape, pixels, labels).hex()


def record_uniforms(images: ImageSet, key: OwnerKey, purpose: str, seed: int) -> np.ndarray:
    """One uniform number in [0, 1) per record, a function of that record's bytes (and label) alone."""
    flat = images.images.reshape(len(images), -1).contiguous().numpy()
    labels = None if images.labels is None else images.labels.numpy().astype("<i8", copy=False)
    head = f"membership-v1;{purpose};{int(seed)}".encode()
    out = np.empty(len(images), dtype=np.float64)
    for i in range(len(images)):
        label = b"" if labels is None else labels[i].tobytes()
        digest = key.mac(head, flat[i].tobytes(), label)
        out[i] = int.from_bytes(digest[:8], "little") / 2.0 ** 64
    return out


def keyed_members(images: ImageSet, key: OwnerKey, fraction: float, purpose: str, seed: int) -> torch.Tensor:
    """Bool mask: record i is a member iff its keyed uniform is below `fraction`."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction={fraction!r} must be in [0, 1]")
    if fraction == 0.0:
        return torch.zeros(len(images), dtype=torch.bool)
    if fraction == 1.0:
        return torch.ones(len(images), dtype=torch.bool)
    return torch.from_numpy(record_uniforms(images, key, purpose, seed) < fraction)
