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

The noisy-val budget can be reserved at creation (`--noisy-val-eps`): its (Gaussian)
event then sits in the ledger before fine-tuning, so DP-SGD's calibration leaves room
for it and the whole run still fits the target. Without a reservation, evaluate
charges the event itself and refuses when it would exceed the run's target epsilon.
"""

from __future__ import annotations

import math

import torch

from ..data import ImageSet
from ..data.keyed import keyed_members, keyed_tag
from ..errors import BadInput
from ..evaluation.selection import NOISES
from ..privacy.accountant import calibrate_gaussian_sigma, epsilon_upper
from ..privacy.events import GaussianEvent, LaplaceEvent, PrivacyEvent
from ..privacy.owner_key import OwnerKey

MAX_FRACTION = 0.5


def check_holdout(fraction: float) -> None:
    ok = isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and math.isfinite(fraction)
    if not ok or not 0.0 <= fraction <= MAX_FRACTION:
        raise BadInput(f"--holdout {fraction!r} is not allowed; it must be a fraction in [0, {MAX_FRACTION}]")


def check_noise(noise: str) -> None:
    if noise not in NOISES:
        raise BadInput(f"--val-noise {noise!r} is unknown; choose one of {', '.join(NOISES)}")


def holdout_mask(images: ImageSet, fraction: float, seed: int, key: OwnerKey) -> torch.Tensor:
    """Bool mask of the hold-out: each record in with probability `fraction`, decided from a keyed
    hash of its own bytes (1-stable: adding or removing an image moves no other image in or out)."""
    check_holdout(fraction)
    if fraction == 0:
        return torch.zeros(len(images), dtype=torch.bool)
    if images.labels is None:
        raise BadInput(f"--holdout needs a labelled sensitive set; {images.name} has no labels")
    held = keyed_members(images, key, fraction, "holdout", seed)
    if not held.any() or held.all():
        raise BadInput(f"--holdout {fraction:g} of {len(images)} sensitive images leaves the hold-out or the "
                       f"training part empty; use a larger set or another fraction")
    return held


def split_off(images: ImageSet, fraction: float, seed: int, key: OwnerKey) -> tuple[ImageSet, ImageSet | None]:
    """(training part, hold-out or None)."""
    held = holdout_mask(images, fraction, seed, key)
    if not held.any():
        return images, None
    return images.subset(~held), images.subset(held)


def holdout_record(fraction: float, seed: int, held: ImageSet, key: OwnerKey) -> dict:
    # The hold-out's size is a data-dependent count like N itself: declared public with N (see
    # the manifest's privacy.assumptions); its identity is a keyed tag, never a plain hash.
    return {"fraction": float(fraction), "seed": int(seed), "size": len(held), "tag": keyed_tag(held, key),
            "key_id": key.key_id}


NOTE = "noisy-val: per-epoch correct counts of synthetic-trained checkpoints on the sensitive hold-out"


def _check_eps(flag: str, eps: float) -> None:
    if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and math.isfinite(eps) and eps > 0):
        raise BadInput(f"{flag} {eps!r} is not allowed; it must be a number > 0")


def reservation_event(eps: float, spent: list[PrivacyEvent], delta: float) -> GaussianEvent:
    """The Gaussian noisy-val event reserved at run creation, raising the ledger by at most `eps`.

    Gaussian because its cost does not depend on how many counts are later released
    (see `noisy_val_scale`), and that number is unknown when the run starts.
    """
    _check_eps("--noisy-val-eps", eps)
    sigma = calibrate_gaussian_sigma(spent, epsilon_upper(spent, delta) + eps, delta, stage="evaluate")
    return GaussianEvent(stage="evaluate", noise_multiplier=float(sigma), note=NOTE + " (reserved at run creation)")


def charge_event(eps: float, noise: str, num_counts: int, spent: list[PrivacyEvent], delta: float) -> PrivacyEvent:
    """The noisy-val event for `num_counts` counts, charged at evaluation, worth about `eps`.

    Laplace: each count gets scale K/eps (epsilon0 = eps/K per count, K = num_counts
    compositions; by basic composition the K counts are eps-DP, PRV is tighter).
    Gaussian: noise multiplier solved so the composed PRV bound rises by at most `eps`.
    """
    _check_eps("--val-eps", eps)
    check_noise(noise)
    if num_counts < 1:
        raise BadInput(f"noisy-val needs at least one count to release, got {num_counts}")
    if noise == "laplace":
        return LaplaceEvent(stage="evaluate", epsilon0=float(eps) / num_counts, steps=int(num_counts), note=NOTE)
    sigma = calibrate_gaussian_sigma(spent, epsilon_upper(spent, delta) + eps, delta, stage="evaluate")
    return GaussianEvent(stage="evaluate", noise_multiplier=float(sigma), note=NOTE)


def noisy_val_scale(event: PrivacyEvent, num_counts: int) -> float:
    """Per-count noise scale (Laplace b, or Gaussian std) for releasing `num_counts` counts under `event`.

    Each count (correct predictions of one fixed checkpoint on the hold-out) changes by at
    most 1 when one hold-out image is added or removed, and all K of them can change at
    once: L1 sensitivity K, L2 sensitivity sqrt(K). The checkpoints are trained on
    synthetic data only, so they do not depend on the hold-out.
      Laplace(epsilon0, steps=K): K scalar Laplace mechanisms of sensitivity 1, scale 1/epsilon0 each;
      Gaussian(sigma): the Gaussian mechanism on the vector, std sigma * sqrt(K) per count.
    """
    if num_counts < 1:
        raise BadInput(f"noisy-val needs at least one count to release, got {num_counts}")
    if isinstance(event, LaplaceEvent):
        if num_counts > event.steps:
            raise BadInput(f"the noisy-val event covers {event.steps} counts; {num_counts} were asked for")
        return 1.0 / event.epsilon0
    if isinstance(event, GaussianEvent):
        return event.noise_multiplier * math.sqrt(num_counts)
    raise BadInput(f"noisy-val event must be laplace or gaussian, got {event.mechanism}")
