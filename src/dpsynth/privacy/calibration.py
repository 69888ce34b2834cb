"""Noise calibration: the one bisection every mechanism's noise is solved with.

`calibrate_sigma(spent, target, delta, events_at)` finds the smallest sigma whose events,
composed with what the run already spent, fit the target epsilon (PRV upper bound). A
mechanism describes itself only through `events_at(sigma)`; the bisection knows nothing
else about it (as dp-accounting's `mechanism_calibration`).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

from ..validation import check_positive
from .accountant import epsilon_upper
from .events import PrivacyEvent
from .refusal import Shortfall, default_refusal


def calibrate_sigma(spent: Sequence[PrivacyEvent], target_epsilon: float, delta: float,
                    events_at: Callable[[float], list[PrivacyEvent]], *, sigma_min: float = 0.4, sigma_max: float = 500.0,
                    rel_tol: float = 2e-3, what: str = "its events", advice: str = "",
                    param: str = "eps", given: float | None = None) -> float:
    """Smallest sigma (to rel_tol) such that the PRV upper bound of `spent + events_at(sigma)`
    is <= target_epsilon, for any mechanism whose events all get noisier as sigma grows.
    `sigma_min` bounds the search from below: PRV's grid for a subsampled Gaussian far below
    sigma 0.4 takes gigabytes; a full-data Gaussian release can pass a lower one.

    Bisection on log(sigma); epsilon decreases monotonically in sigma. The returned
    value always satisfies the target (we keep the feasible end of the bracket). When even
    `sigma_max` does not fit, BudgetExhausted carries the `Shortfall` (privacy.refusal):
    `what` the events are, `advice` how to make them cheaper, `param`/`given` the parameter
    that set the target and its value (default: `eps`, the target itself).
    """
    check_positive(param, target_epsilon if given is None else given)

    def eps_at(sigma: float) -> float:
        return epsilon_upper([*spent, *events_at(sigma)], delta)

    already = epsilon_upper(spent, delta)
    if already >= target_epsilon or eps_at(sigma_max) > target_epsilon:
        planned = tuple(events_at(sigma_max))
        given = target_epsilon if given is None else given
        alone = None
        if spent and given == target_epsilon:  # the noise the target would buy them if nothing else were spent
            sigma = smallest_sigma(lambda s: epsilon_upper(events_at(s), delta), given, sigma_min, sigma_max,
                                   rel_tol=0.02)
            if sigma is not None and sigma != sigma_min:  # at sigma_min the bracket cannot say how little would do
                alone = (sigma, eps_at(sigma))
        raise default_refusal(Shortfall(
            stage=planned[0].stage if planned else "this stage", target=target_epsilon, delta=delta,
            spent=tuple(spent), planned=planned, what=what, param=param, given=given,
            noise=f"noise σ={sigma_max:g}, the most calibration tries", advice=advice, alone=alone))
    return smallest_sigma(eps_at, target_epsilon, sigma_min, sigma_max, rel_tol)  # not None: sigma_max fits


def smallest_sigma(eps_at: Callable[[float], float], target: float, lo: float, hi: float,
                   rel_tol: float = 2e-3) -> float | None:
    """Smallest sigma in [lo, hi] (to rel_tol, on log sigma) with eps_at(sigma) <= target, or None
    if even hi does not fit. eps_at must decrease in sigma; the result always fits."""
    if eps_at(hi) > target:
        return None
    if eps_at(lo) <= target:
        return lo
    while hi / lo > 1 + rel_tol:
        mid = math.sqrt(lo * hi)
        if eps_at(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi
