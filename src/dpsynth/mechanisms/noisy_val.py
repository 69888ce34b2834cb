"""The noisy-val release: noisy correct-counts of synthetic-trained checkpoints on the run's
sensitive hold-out (`pipeline.holdout`), and the ledger events that pay for it.

The noisy-val budget can be reserved at creation (`--noisy-val-eps`): its (Gaussian)
event then sits in the ledger before fine-tuning, so DP-SGD's calibration leaves room
for it and the whole run still fits the target. Without a reservation, evaluate
charges the event itself and refuses when it would exceed the run's target epsilon.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..errors import BadInput
from ..privacy.accountant import epsilon_upper
from ..privacy.plans import gaussian_release_sigma
from ..privacy.events import GaussianEvent, LaplaceEvent, PrivacyEvent
from ..validation import check_choice, check_positive
from .secret_noise import secret_numpy_rng

NOISES = ("laplace", "gaussian")
RESERVED = "(reserved at run creation)"  # in the note of the event reserved when the run was created


def check_noise(noise: str) -> None:
    check_choice("val_noise", noise, NOISES)


NOTE = "noisy-val: per-epoch correct counts of synthetic-trained checkpoints on the sensitive hold-out"




def reservation_event(eps: float, spent: list[PrivacyEvent], delta: float) -> GaussianEvent:
    """The Gaussian noisy-val event reserved at run creation, raising the ledger by at most `eps`.

    Gaussian because its cost does not depend on how many counts are later released
    (see `noisy_val_scale`), and that number is unknown when the run starts.
    """
    check_positive("noisy_val_eps", eps)
    sigma = gaussian_release_sigma(spent, epsilon_upper(spent, delta) + eps, delta, stage="evaluate",
                                   param="noisy_val_eps", given=eps, what="its reserved noisy-val release")
    return GaussianEvent(stage="evaluate", noise_multiplier=float(sigma), note=f"{NOTE} {RESERVED}")


def charge_event(eps: float, noise: str, num_counts: int, spent: list[PrivacyEvent], delta: float) -> PrivacyEvent:
    """The noisy-val event for `num_counts` counts, charged at evaluation, worth about `eps`.

    Laplace: each count gets scale K/eps (epsilon0 = eps/K per count, K = num_counts
    compositions; by basic composition the K counts are eps-DP, PRV is tighter).
    Gaussian: noise multiplier solved so the composed PRV bound rises by at most `eps`.
    """
    check_positive("val_eps", eps)
    check_noise(noise)
    if num_counts < 1:
        raise BadInput(f"noisy-val needs at least one count to release, got {num_counts}")
    if noise == "laplace":
        return LaplaceEvent(stage="evaluate", epsilon0=float(eps) / num_counts, steps=int(num_counts), note=NOTE)
    sigma = gaussian_release_sigma(spent, epsilon_upper(spent, delta) + eps, delta, stage="evaluate",
                                   param="val_eps", given=eps, what="its noisy-val counts")
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


def noise_rng(seed: int | None = None) -> np.random.Generator:
    """DP noise must be unpredictable: OS entropy unless a test passes a seed."""
    return secret_numpy_rng() if seed is None else np.random.default_rng(seed)


def add_noise(count: float, noise: str, scale: float, rng: np.random.Generator) -> float:
    """`count` + Laplace(scale) or + N(0, scale^2): one noisy holdout count."""
    check_noise(noise)
    if not (np.isfinite(scale) and scale > 0):
        raise BadInput(f"noise scale {scale!r} must be a finite number > 0")
    draw = rng.laplace(0.0, scale) if noise == "laplace" else rng.normal(0.0, scale)
    return float(count + draw)


def noisy_scores(correct_counts: Sequence[int], holdout_size: int, noise: str, scale: float,
                 rng: np.random.Generator) -> list[float]:
    """Noisy holdout accuracies (noisy count / size) of a sequence of epochs."""
    if holdout_size < 1:
        raise BadInput(f"the sensitive hold-out is empty; noisy-val needs at least one image")
    return [add_noise(c, noise, scale, rng) / holdout_size for c in correct_counts]
