"""The sensitive hold-out for `evaluate --protocol noisy-val`, fixed when a run is created.

A stratified, seeded share of the sensitive TRAINING set is set aside before any
mechanism reads it: every stage that trains on sensitive data gets the rest, so
the generator never sees the hold-out. Its indices' sha256 goes into the manifest
and is checked on every later load.

Privacy: the hold-out is sensitive data too. We do not claim parallel composition
between the generator's part and the hold-out (under add/remove adjacency an
index-based split is not data-independent); the noisy-val release is simply one
more event in the run's sequential composition.

The noisy-val budget can be reserved at creation (`--noisy-val-eps`): its (Gaussian)
event then sits in the ledger before fine-tuning, so DP-SGD's calibration leaves room
for it and the whole run still fits the target. Without a reservation, evaluate
charges the event itself and refuses when it would exceed the run's target epsilon.
"""

from __future__ import annotations

import hashlib
import math

import torch

from ..data import ImageSet
from ..errors import BadInput
from ..evaluation.selection import NOISES
from ..evaluation.splits import stratified_split
from ..privacy.accountant import calibrate_gaussian_sigma, epsilon_upper
from ..privacy.events import GaussianEvent, LaplaceEvent, PrivacyEvent

MAX_FRACTION = 0.5
# Salt so the hold-out draw is not the same permutation as other seed-driven splits.
_SALT = 0x484F4C44


def check_holdout(fraction: float) -> None:
    ok = isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and math.isfinite(fraction)
    if not ok or not 0.0 <= fraction <= MAX_FRACTION:
        raise BadInput(f"--holdout {fraction!r} is not allowed; it must be a fraction in [0, {MAX_FRACTION}]")


def check_noise(noise: str) -> None:
    if noise not in NOISES:
        raise BadInput(f"--val-noise {noise!r} is unknown; choose one of {', '.join(NOISES)}")


def holdout_indices(images: ImageSet, fraction: float, seed: int) -> torch.Tensor:
    """Sorted indices of the hold-out: round(n_c * fraction) per class, deterministic in `seed`."""
    check_holdout(fraction)
    if fraction == 0:
        return torch.zeros(0, dtype=torch.int64)
    if images.labels is None:
        raise BadInput(f"--holdout needs a labelled sensitive set; {images.name} has no labels")
    try:
        _, held = stratified_split(images.labels, fraction, seed ^ _SALT)
    except BadInput:
        raise BadInput(f"--holdout {fraction:g} of {len(images)} sensitive images leaves the hold-out or the "
                       f"training part empty; use a larger set or another fraction") from None
    return held.sort().values


def indices_sha256(indices: torch.Tensor) -> str:
    return "sha256:" + hashlib.sha256(indices.to(torch.int64).numpy().astype("<i8").tobytes()).hexdigest()


def split_off(images: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet | None, torch.Tensor]:
    """(training part, hold-out or None, hold-out indices into `images`)."""
    held = holdout_indices(images, fraction, seed)
    if held.numel() == 0:
        return images, None, held
    keep = torch.ones(len(images), dtype=torch.bool)
    keep[held] = False
    return images.subset(keep), images.subset(held), held


def holdout_record(fraction: float, seed: int, indices: torch.Tensor, total: int) -> dict:
    return {"fraction": float(fraction), "seed": int(seed), "size": int(indices.numel()),
            "of_sensitive_train": int(total), "indices_sha256": indices_sha256(indices)}


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
