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
* ``dpimagebench-val``: how DPImageBench's published tables choose checkpoints
  (its evaluator's default ``eval.mode=val``): the score is the UN-noised accuracy
  on a hold-out of the sensitive training set (5,000 images there). It reads
  sensitive data without noise, so it is NOT DP either: a named comparison for
  figures put beside the published ones, never a DP result.

Every rule picks the first epoch with the highest score.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dpsynth.errors import BadInput
from dpsynth.validation import check_choice

DP_SAFE = "dp-safe-selection"
NOISY_VAL = "noisy-val"
TEST_SET = "test-set-selection"
DPIMAGEBENCH_VAL = "dpimagebench-val"
PROTOCOLS = (DP_SAFE, NOISY_VAL, TEST_SET, DPIMAGEBENCH_VAL)
HOLDOUT_PROTOCOLS = (NOISY_VAL, DPIMAGEBENCH_VAL)  # these score on the run's sensitive hold-out


def is_dp_safe(protocol: str) -> bool:
    return protocol in (DP_SAFE, NOISY_VAL)


def check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        check_choice("protocol", protocol, PROTOCOLS)


def best_epoch(scores: Sequence[float]) -> int:
    """1-based epoch of the highest score; ties go to the earliest (no look-ahead needed)."""
    if len(scores) == 0:
        raise BadInput("no per-epoch scores to select from")
    values = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(values).all():
        raise BadInput("per-epoch selection scores must be finite")
    return int(np.argmax(values)) + 1
