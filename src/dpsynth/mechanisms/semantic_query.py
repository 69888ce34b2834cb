"""PrivImage's semantic distribution query, as pure functions over label histograms.

Each sensitive image is labelled with its top-k public classes by a classifier trained
on public data. It adds 1 to k distinct cells of one row (its own class's row when the
sensitive set is labelled, the single row otherwise), so adding or removing one image
changes the histogram by at most sqrt(k) in L2 norm: the Gaussian mechanism with noise
std sigma * sqrt(k) is the Gaussian mechanism with noise multiplier sigma.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import BadInput
from .secret_noise import secret_numpy_rng


def semantic_histogram(topk: torch.Tensor, sensitive_labels: torch.Tensor | None, num_rows: int,
                       num_public_classes: int) -> np.ndarray:
    """Counts (rows, public classes); rows = sensitive classes, or 1 for unlabelled data."""
    if topk.ndim != 2:
        raise BadInput(f"top-k predictions must be (N, k), got shape {tuple(topk.shape)}")
    rows = torch.zeros(len(topk), dtype=torch.long) if sensitive_labels is None else sensitive_labels.long()
    hist = torch.zeros(num_rows, num_public_classes, dtype=torch.float64)
    flat_rows = rows.repeat_interleave(topk.shape[1])
    hist.index_put_((flat_rows, topk.reshape(-1).long()), torch.ones(topk.numel(), dtype=torch.float64),
                    accumulate=True)
    return hist.numpy()


def l2_sensitivity(top_k: int) -> float:
    return math.sqrt(top_k)


def add_gaussian_noise(hist: np.ndarray, noise_multiplier: float, top_k: int,
                       rng: np.random.Generator | None = None) -> np.ndarray:
    """hist + N(0, (sigma * sqrt(k))^2). The default rng is seeded from OS entropy: DP noise
    must never be reproducible from the run's recorded seed."""
    rng = rng if rng is not None else secret_numpy_rng()
    return hist + rng.normal(0.0, noise_multiplier * l2_sensitivity(top_k), size=hist.shape)


def flat_rows(noisy: np.ndarray, noise_multiplier: float, top_k: int, alpha: float = 0.01) -> list[int]:
    """Rows whose noisy counts show no public class fitting better than the others (post-processing of
    the release only). Under "no class fits" a row's n*k votes fall evenly, so each count is its mean
    plus sampling spread (variance at most the mean) plus the noise (variance sigma^2 k); the row is flat
    when sum((x - mean)^2) / (sigma^2 k + mean) stays within the chi-square(C - 1) quantile 1 - alpha."""
    from scipy.stats import chi2

    num_public = noisy.shape[1]
    limit = chi2.ppf(1.0 - alpha, num_public - 1)
    flat = []
    for row, counts in enumerate(np.asarray(noisy, dtype=np.float64)):
        mean = float(counts.mean())
        spread = float(((counts - mean) ** 2).sum()) / (noise_multiplier ** 2 * top_k + max(mean, 0.0))
        if spread <= limit:
            flat.append(row)
    return flat


def select_public_classes(noisy: np.ndarray, n_select: int) -> list[tuple[int, int]]:
    """(public class, row) pairs. Rows take turns choosing their highest noisy public class
    not yet taken by another row, so every sensitive class gets its own public classes."""
    num_rows, num_public = noisy.shape
    if not (1 <= n_select <= num_public):
        raise BadInput(f"select={n_select} must be between 1 and the number of public classes ({num_public})")
    taken: set[int] = set()
    chosen: list[tuple[int, int]] = []
    order = [np.argsort(-noisy[row], kind="stable") for row in range(num_rows)]
    while len(chosen) < n_select:
        for row in range(num_rows):
            if len(chosen) == n_select:
                break
            pick = next(int(c) for c in order[row] if int(c) not in taken)
            taken.add(pick)
            chosen.append((pick, row))
    return chosen
