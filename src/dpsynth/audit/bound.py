"""The one-run audit's lower bound on epsilon (Steinke, Nasr and Jagielski, NeurIPS 2023).

m canaries are each included with probability 1/2; a guesser that sees only the trained
output makes r guesses, v of them correct. If training is (eps, delta)-DP in each canary,
P[v or more correct] <= p(eps, delta) = beta + 2*m*delta*A, with q = e^eps / (1 + e^eps),
beta = P[Bin(r, q) >= v] and A = max_{1<=i<=v} P[v-i <= Bin(r, q) < v] / i (Thm 3.1 and its
approximate-DP extension). p grows with eps, so every eps with p(eps) <= alpha is rejected
and the lower bound is the largest such eps, found by bisection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import binom

from ..errors import BadInput

EPS_SEARCH_MAX = 50.0


def one_run_p_value(epsilon: float, delta: float, m: int, r: int, v: int) -> float:
    """p(eps, delta) of observing >= v correct out of r guesses among m canaries."""
    if not (0 <= v <= r <= m):
        raise BadInput(f"audit counts must satisfy 0 <= v <= r <= m; got m={m}, r={r}, v={v}")
    if v == 0:
        return 1.0
    q = math.exp(epsilon) / (1.0 + math.exp(epsilon)) if epsilon < 700 else 1.0
    beta = float(binom.sf(v - 1, r, q))  # P[Bin >= v]
    if delta == 0:
        return beta
    i = np.arange(1, v + 1)
    below_v = binom.cdf(v - 1, r, q)
    window = below_v - binom.cdf(v - i - 1, r, q)  # P[v-i <= Bin < v]
    return float(beta + 2 * m * delta * np.max(window / i))


def one_run_epsilon_lower_bound(m: int, r: int, v: int, delta: float, alpha: float = 0.05,
                                tol: float = 1e-4) -> float:
    """Largest eps whose p-value is <= alpha: eps is a lower bound with confidence 1 - alpha."""
    if not (0 < alpha < 1):
        raise BadInput(f"alpha={alpha!r} must be in (0, 1)")
    if not (0 <= delta < 1):
        raise BadInput(f"delta={delta!r} must be in [0, 1)")
    if one_run_p_value(0.0, delta, m, r, v) > alpha:
        return 0.0
    lo, hi = 0.0, EPS_SEARCH_MAX
    if one_run_p_value(hi, delta, m, r, v) <= alpha:
        return hi
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if one_run_p_value(mid, delta, m, r, v) <= alpha:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class AuditGuess:
    k: int          # guesses per side: IN for the k highest scores, OUT for the k lowest
    r: int
    v: int
    epsilon_lb: float


def guess_counts(scores: np.ndarray, included: np.ndarray, k: int) -> tuple[int, int]:
    """Two-sided guess: IN for the k highest scores, OUT for the k lowest; returns (r, v)."""
    m = len(scores)
    if not (1 <= k and 2 * k <= m):
        raise BadInput(f"guesses per side k={k} must be between 1 and m/2 = {m // 2}")
    order = np.argsort(scores, kind="stable")
    low, high = order[:k], order[m - k:]
    correct = int(included[high].sum()) + int((~included[low]).sum())
    return 2 * k, correct


def best_guess(scores: np.ndarray, included: np.ndarray, ks: list[int], delta: float,
               alpha: float = 0.05) -> AuditGuess:
    """The tightest bound over a grid of k fixed in advance, Bonferroni-corrected (alpha / len(ks)),
    so choosing the best k after seeing the counts keeps the confidence level."""
    included = np.asarray(included, dtype=bool)
    m = len(scores)
    results = []
    for k in ks:
        r, v = guess_counts(np.asarray(scores), included, k)
        results.append(AuditGuess(k, r, v, one_run_epsilon_lower_bound(m, r, v, delta, alpha / len(ks))))
    return max(results, key=lambda g: g.epsilon_lb)


def default_ks(m: int) -> list[int]:
    """The grid of the research note (section 4): m/40, m/20, m/10, m/5 and 0.45 m per side."""
    return sorted({max(1, int(round(f * m))) for f in (1 / 40, 1 / 20, 1 / 10, 1 / 5, 0.45)})
