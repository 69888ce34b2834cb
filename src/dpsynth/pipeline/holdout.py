"""The sensitive hold-out for `evaluate --protocol noisy-val`, fixed when a run is created.

A share of the sensitive TRAINING set is set aside before any mechanism reads it:
every stage that trains on sensitive data gets the rest, so the generator never sees
the hold-out. Each record's membership is decided from a keyed hash of its own bytes
(`dpsynth.data.keyed`), so it is 1-stable; the hold-out's keyed tag goes into the
manifest and is checked on every later load.

Privacy: the hold-out is sensitive data too. We do not claim parallel composition
between the generator's part and the hold-out (conservative, though the keyed split
would allow it); the noisy-val release is simply one more event in the run's
sequential composition.
"""

from __future__ import annotations


import torch

from ..data import ImageSet
from ..data.keyed import keyed_members, keyed_tag
from ..errors import BadInput
from ..validation import check_fraction
from ..privacy.owner_key import OwnerKey

MAX_FRACTION = 0.5


def check_holdout(fraction: float) -> None:
    check_fraction("holdout", fraction, low=0.0, high=MAX_FRACTION, closed=True)


def holdout_mask(images: ImageSet, fraction: float, seed: int, key: OwnerKey) -> torch.Tensor:
    """Bool mask of the hold-out: each record in with probability `fraction`, decided from a keyed
    hash of its own bytes (1-stable: adding or removing an image moves no other image in or out)."""
    check_holdout(fraction)
    if fraction == 0:
        return torch.zeros(len(images), dtype=torch.bool)
    if images.labels is None:
        raise BadInput(f"`holdout` needs a labelled sensitive set; {images.name} has no labels")
    held = keyed_members(images, key, fraction, "holdout", seed)
    if not held.any() or held.all():
        raise BadInput(f"holdout={fraction:g} of {len(images)} sensitive images leaves the hold-out or the "
                       f"training part empty; use a larger set or another fraction")
    return held


def split_off(images: ImageSet, fraction: float, seed: int, key: OwnerKey) -> tuple[ImageSet, ImageSet | None]:
    """(training part, hold-out or None)."""
    held = holdout_mask(images, fraction, seed, key)
    if not held.any():
        return images, None
    return images.subset(~held), images.subset(held)


def holdout_record(fraction: float, seed: int, held: ImageSet, key: OwnerKey, size: int) -> dict:
    # `size` is the hold-out's size as N is stated (declared with --public-size, else the true count,
    # public with N: see the manifest's privacy.assumptions); its identity is a keyed tag, never a plain hash.
    return {"fraction": float(fraction), "seed": int(seed), "size": int(size), "tag": keyed_tag(held, key),
            "key_id": key.key_id}
