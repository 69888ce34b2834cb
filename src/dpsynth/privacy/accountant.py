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
from prv_accountant.privacy_random_variables import PrivacyRandomVariable
from scipy.stats import norm

from ..errors import BadInput, BudgetExhausted
from .events import GaussianEvent, LaplaceEvent, PoissonGaussianEvent, PrivacyEvent, ShardGaussianEvent

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


class ShardGaussianStep(PrivacyRandomVariable):
    """One step of a ShardGaussianEvent as a privacy random variable (loss under P).

    Dominating pair of one step, with the indicator b "this step used the image's shard"
    visible: P = (b ~ Bern(p), Y ~ N(b/sigma, 1)), Q = (b ~ Bern(p), Y ~ N(0, 1)),
    p = 1/shards. Its privacy loss is 0 with probability 1 - p and N(mu^2/2, mu^2),
    mu = 1/sigma, with probability p. T-fold composition gives K = sum(b) ~ Bin(T, p) and
    the K-fold Gaussian given K: exactly the pair that dominates the whole T-step event in
    both directions (the pair is symmetric: swapping P and Q maps it to itself up to a
    reflection of Y), so composing this PRV T times with prv-accountant, with any other
    events, is sound. The argument is about the T-step event as a whole (any prefix of t
    steps is dominated by the t-fold composition alike), not step by step: the image's
    shard is fixed, so step t is not dominated by one copy of this pair given steps < t.
    Derivation: gan/gs_wgan.py and docs/DECISIONS.md.
    """

    def __init__(self, noise_multiplier: float, shards: int) -> None:
        self.p = 1.0 / shards
        self.mu = 1.0 / noise_multiplier

    def cdf(self, t):
        t = np.asarray(t)
        point_mass = np.where(t >= 0, 1.0 - self.p, 0.0)  # steps that did not use the image: loss 0
        return point_mass + self.p * norm.cdf(np.double(t / self.mu - self.mu / 2))

    def rdp(self, alpha: float) -> float:
        # D_alpha of the pair above: log(1 - p + p exp(alpha (alpha - 1) mu^2 / 2)) / (alpha - 1).
        exponent = alpha * (alpha - 1) * self.mu ** 2 / 2
        if self.p == 1.0:
            return exponent / (alpha - 1)
        return float(np.logaddexp(math.log1p(-self.p), math.log(self.p) + exponent) / (alpha - 1))


def _prv(event: PrivacyEvent):
    # Plain dict lookup: every event type must have a PRV, else we refuse (never skip).
    if isinstance(event, PoissonGaussianEvent):
        if event.sample_rate == 1.0:
            return GaussianMechanism(noise_multiplier=event.noise_multiplier)
        return PoissonSubsampledGaussianMechanism(sampling_probability=event.sample_rate,
                                                  noise_multiplier=event.noise_multiplier)
    if isinstance(event, GaussianEvent):
        return GaussianMechanism(noise_multiplier=event.noise_multiplier)
    if isinstance(event, ShardGaussianEvent):
        return ShardGaussianStep(event.noise_multiplier, event.shards)
    if isinstance(event, LaplaceEvent):
        return LaplaceMechanism(mu=event.epsilon0)
    raise BadInput(f"no accountant for privacy event {event!r}")


def _grouped(events: Iterable[PrivacyEvent]) -> list[tuple[PrivacyEvent, int]]:
    """Identical mechanisms are merged into one self-composition (same result, faster).

    For shard_gaussian events this is exact too: each event is dominated by its T-step
    pair (ShardGaussianStep), and the product of the pairs of T1 and T2 steps is the pair of
    T1 + T2 steps (Bin(T1, p) + Bin(T2, p) = Bin(T1 + T2, p) for independent shard draws;
    one shared draw over T1 + T2 steps gives the same pair)."""
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
        elif isinstance(event, ShardGaussianEvent):
            # Renyi divergence of the dominating pair (exact for it, so valid for the mechanism
            # by data processing), summed over steps as the pair is a T-fold product.
            step = ShardGaussianStep(event.noise_multiplier, event.shards)
            total += event.steps * np.array([step.rdp(a) for a in orders])
        elif isinstance(event, (GaussianEvent, PoissonGaussianEvent)):
            total += opacus_rdp.compute_rdp(q=event.sample_rate, noise_multiplier=event.noise_multiplier,
                                            steps=event.steps, orders=orders)
        else:
            raise BadInput(f"no RDP accountant for privacy event {event!r}")
    eps, _ = opacus_rdp.get_privacy_spent(orders=orders, rdp=total, delta=delta)
    return float(eps)
