"""Epsilon of a composition of privacy events, with prv-accountant (and an RDP cross-check).

The number the product reports is PRV's *upper* bound (Gopi, Lee, Wutschitz 2021), never
its estimate: the numerical error of the discretisation is added, so we can only over-count.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
from prv_accountant import (GaussianMechanism, LaplaceMechanism, PoissonSubsampledGaussianMechanism,
                            PRVAccountant)

from ..errors import BadInput, BudgetExhausted
from .events import GaussianEvent, LaplaceEvent, PoissonGaussianEvent, PrivacyEvent

# Discretisation error budget. 0.01 in epsilon is well below any budget anyone states.
EPS_ERROR = 0.01


@dataclass(frozen=True)
class EpsilonBounds:
    lower: float
    estimate: float
    upper: float
    accountant: str = "prv"  # "rdp" when PRV's discretisation failed and RDP's bound is reported


def check_delta(delta: float) -> None:
    if not (isinstance(delta, (int, float)) and math.isfinite(delta) and 0 < delta < 1):
        raise BadInput(f"delta={delta!r} is not allowed; it must be in (0, 1)")


def default_delta(n: int) -> float:
    """DPImageBench's choice delta = 1 / (N ln N), below 1/N as a meaningful delta must be."""
    if n < 3:
        raise BadInput(f"sensitive dataset size {n} is too small to set a default delta; pass `delta`")
    return 1.0 / (n * math.log(n))


def _prv(event: PrivacyEvent):
    # Plain dict lookup: every event type must have a PRV, else we refuse (never skip).
    if isinstance(event, PoissonGaussianEvent):
        if event.sample_rate == 1.0:
            return GaussianMechanism(noise_multiplier=event.noise_multiplier)
        return PoissonSubsampledGaussianMechanism(sampling_probability=event.sample_rate,
                                                  noise_multiplier=event.noise_multiplier)
    if isinstance(event, GaussianEvent):
        return GaussianMechanism(noise_multiplier=event.noise_multiplier)
    if isinstance(event, LaplaceEvent):
        return LaplaceMechanism(mu=event.epsilon0)
    raise BadInput(f"no accountant for privacy event {event!r}")


def _grouped(events: Iterable[PrivacyEvent]) -> list[tuple[PrivacyEvent, int]]:
    """Identical mechanisms are merged into one self-composition (same result, faster)."""
    counts: Counter = Counter()
    for event in events:
        key = (type(event), event.to_dict()["mechanism"],
               tuple(sorted((k, v) for k, v in event.to_dict().items()
                            if k not in ("stage", "steps", "note", "mechanism"))))
        counts[key] += event.compositions
    groups = []
    for (cls, _mech, params), steps in counts.items():
        groups.append((cls(stage="", steps=steps, **dict(params)), steps))
    return groups


def compose_epsilon(events: Sequence[PrivacyEvent], delta: float) -> EpsilonBounds:
    """(lower, estimate, upper) epsilon of the composition of `events` at `delta` (PRV)."""
    check_delta(delta)
    return _compose_cached(tuple(events), float(delta))


@functools.lru_cache(maxsize=4096)
def _compose_cached(events: tuple[PrivacyEvent, ...], delta: float) -> EpsilonBounds:
    # Pure function of frozen events: calibration and the ledger ask for the same
    # compositions again within one process, and each PRV evaluation costs ~0.5 s.
    groups = _grouped(events)
    if not groups:
        return EpsilonBounds(0.0, 0.0, 0.0)
    prvs = [_prv(event) for event, _ in groups]
    steps = [n for _, n in groups]
    for eps_error in (EPS_ERROR, 10 * EPS_ERROR):
        try:
            accountant = PRVAccountant(prvs=prvs, max_self_compositions=steps, eps_error=eps_error,
                                       delta_error=delta / 1000)
            lower, estimate, upper = accountant.compute_epsilon(delta=delta, num_self_compositions=steps)
        except (RuntimeError, ValueError, FloatingPointError, OverflowError):
            continue  # prv-accountant's discretisation can fail for very low noise
        if np.isfinite(upper):
            return EpsilonBounds(float(max(lower, 0.0)), float(max(estimate, 0.0)), float(max(upper, 0.0)))
    # RDP's epsilon is a valid (looser) upper bound: report it rather than nothing, and say so.
    rdp = rdp_epsilon(events, delta)
    return EpsilonBounds(0.0, rdp, rdp, accountant="rdp")


def epsilon_upper(events: Sequence[PrivacyEvent], delta: float) -> float:
    return compose_epsilon(events, delta).upper


# ---- RDP cross-check (opacus' independent RDP analysis) ----------------------------------

RDP_ORDERS = [1.0 + x / 10.0 for x in range(1, 100)] + list(range(12, 256))


def _laplace_rdp(epsilon0: float, order: float) -> float:
    # Mironov 2017, Prop. 6: RDP of the Laplace mechanism with scale 1/epsilon0.
    a, b = order, 1.0 / epsilon0
    return (1.0 / (a - 1)) * np.logaddexp(math.log(a / (2 * a - 1)) + (a - 1) / b,
                                          math.log((a - 1) / (2 * a - 1)) - a / b)


def rdp_epsilon(events: Sequence[PrivacyEvent], delta: float) -> float:
    """Epsilon from Renyi DP composition (looser than PRV; a cross-check, not the report)."""
    from opacus.accountants.analysis import rdp as opacus_rdp

    check_delta(delta)
    if not events:
        return 0.0
    orders = np.array(RDP_ORDERS)
    total = np.zeros_like(orders)
    for event in events:
        if isinstance(event, LaplaceEvent):
            total += event.steps * np.array([_laplace_rdp(event.epsilon0, a) for a in orders])
        else:
            total += opacus_rdp.compute_rdp(q=event.sample_rate, noise_multiplier=event.noise_multiplier,
                                            steps=event.steps, orders=orders)
    eps, _ = opacus_rdp.get_privacy_spent(orders=orders, rdp=total, delta=delta)
    return float(eps)
