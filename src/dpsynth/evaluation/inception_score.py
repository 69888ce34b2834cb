"""Inception Score from class probabilities (Salimans et al., 2016).

IS = exp( E_x KL( p(y|x) || p(y) ) ), with p(y) the mean prediction over the
split, computed on each of `splits` disjoint parts and reported as mean and
standard deviation over the parts, as in the original code.

We have no Inception weights, so the probabilities come from a domain
classifier (e.g. one trained on the sensitive dataset's labels). The caller
must label the figure with that classifier's name ("IS on <classifier>"):
it is not the Inception Score of the literature and not comparable to it.
The range is [1, C] for C classes.
"""

from __future__ import annotations

import numpy as np

from dpsynth.errors import BadInput

# Rows may come from float32 softmax; allow that much slack in their sums.
SUM_TOLERANCE = 1e-3


def inception_score(probabilities, splits: int = 10) -> tuple[float, float]:
    """(mean, std) of IS over `splits` parts of an (N, C) array of per-sample class probabilities.

    Parts are contiguous, as equal as possible (numpy.array_split), so no
    sample is dropped; std is the population std over parts (ddof=0).
    """
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] < 2:
        raise BadInput(f"probabilities must be an (N, C) array with N >= 1 and C >= 2, got shape {p.shape}")
    if not np.isfinite(p).all() or (p < 0).any():
        raise BadInput("probabilities must be finite and non-negative (pass softmax outputs, not logits)")
    worst = np.abs(p.sum(axis=1) - 1.0).max()
    if worst > SUM_TOLERANCE:
        raise BadInput(f"probability rows must sum to 1 (within {SUM_TOLERANCE}); worst row is off by {worst:.3g}")
    if not isinstance(splits, (int, np.integer)) or not 1 <= splits <= len(p):
        raise BadInput(f"splits must be an integer in [1, {len(p)}] (number of samples), got {splits!r}")
    p = p / p.sum(axis=1, keepdims=True)

    scores = []
    for part in np.array_split(p, splits):
        marginal = part.mean(axis=0, keepdims=True)
        # 0 * log 0 = 0: terms with p(y|x) = 0 contribute nothing (and p(y) > 0 wherever p(y|x) > 0).
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0)
        scores.append(np.exp(terms.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))
