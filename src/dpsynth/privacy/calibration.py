"""Noise calibration: the one bisection every mechanism's noise is solved with.

`calibrate_sigma(spent, target, delta, events_at)` finds the smallest sigma whose events,
composed with what the run already spent, fit the target epsilon (PRV upper bound). A
mechanism describes itself only through `events_at(sigma)`; the bisection knows nothing
else about it (as dp-accounting's `mechanism_calibration`).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

from ..errors import BudgetExhausted
from ..validation import check_positive
from .accountant import epsilon_upper
from .events import PrivacyEvent


def calibrate_sigma(spent: Sequence[PrivacyEvent], target_epsilon: float, delta: float,
                    events_at: Callable[[float], list[PrivacyEvent]], *, sigma_min: float = 0.4, sigma_max: float = 500.0,
                    rel_tol: float = 2e-3, too_little: str = "", advice: str = "use a larger `eps`") -> float:
    """Smallest sigma (to rel_tol) such that the PRV upper bound of `spent + events_at(sigma)`
    is <= target_epsilon, for any mechanism whose events all get noisier as sigma grows.
    `sigma_min` bounds the search from below: PRV's grid for a subsampled Gaussian far below
    sigma 0.4 takes gigabytes; a full-data Gaussian release can pass a lower one.

    Bisection on log(sigma); epsilon decreases monotonically in sigma. The returned
    value always satisfies the target (we keep the feasible end of the bracket).
    """
    check_positive("eps", target_epsilon)
    already = epsilon_upper(spent, delta)
    if already >= target_epsilon:
        raise BudgetExhausted(
            f"the run has already spent epsilon={already:.3f} of the target eps={target_epsilon:g}; "
            f"raise `eps` or start a new run directory")

    def eps_at(sigma: float) -> float:
        return epsilon_upper([*spent, *events_at(sigma)], delta)

    if eps_at(sigma_max) > target_epsilon:
        raise BudgetExhausted(
            f"even noise_multiplier={sigma_max:g} exceeds eps={target_epsilon:g} {too_little} "
            f"(already spent {already:.3f}); {advice}")
    lo, hi = sigma_min, sigma_max
    if eps_at(lo) <= target_epsilon:
        return lo
    while hi / lo > 1 + rel_tol:
        mid = math.sqrt(lo * hi)
        if eps_at(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi
