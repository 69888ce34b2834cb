"""The three checkpoint-selection protocols as pure rules over per-epoch scores.

* ``dp-safe-selection``: the score is accuracy on a split of the SYNTHETIC set
  (DPImageBench: 55,000 train / 5,000 validation of 60,000; 1/12 otherwise).
  No sensitive data is read, so selection costs nothing.
* ``noisy-val``: the score is the number of correct predictions on a held-out
  split of the sensitive TRAINING set, plus Laplace or Gaussian noise. The noise
  scale comes from the ledger event charged for it (`stages.holdout`).
* ``test-set-selection``: the score is real-test accuracy. A data-dependent choice
  on the sensitive test set that no ledger covers: never DP, shown only to measure
  how much it overstates accuracy.

Every rule picks the first epoch with the highest score.
"""

from __future__ import annotations

import secrets
from typing import Sequence

import numpy as np

from dpsynth.errors import BadInput

DP_SAFE = "dp-safe-selection"
NOISY_VAL = "noisy-val"
TEST_SET = "test-set-selection"
PROTOCOLS = (DP_SAFE, NOISY_VAL, TEST_SET)
NOISES = ("laplace", "gaussian")


def is_dp_safe(protocol: str) -> bool:
    return protocol in (DP_SAFE, NOISY_VAL)


def check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise BadInput(f"--protocol {protocol!r} is unknown; choose one of {', '.join(PROTOCOLS)}")


def best_epoch(scores: Sequence[float]) -> int:
    """1-based epoch of the highest score; ties go to the earliest (no look-ahead needed)."""
    if len(scores) == 0:
        raise BadInput("no per-epoch scores to select from")
    values = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(values).all():
        raise BadInput("per-epoch selection scores must be finite")
    return int(np.argmax(values)) + 1


def noise_rng(seed: int | None = None) -> np.random.Generator:
    """DP noise must be unpredictable: OS entropy unless a test passes a seed."""
    return np.random.default_rng(secrets.randbits(128) if seed is None else seed)


def add_noise(count: float, noise: str, scale: float, rng: np.random.Generator) -> float:
    """`count` + Laplace(scale) or + N(0, scale^2): one noisy holdout count."""
    if noise not in NOISES:
        raise BadInput(f"--val-noise {noise!r} is unknown; choose one of {', '.join(NOISES)}")
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
