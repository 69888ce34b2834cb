"""The one budget refusal: what a stage needed, what the run had spent, and what would fit.

Every refusal for lack of privacy budget (a calibration that cannot fit, DP-FETA's central
images, evaluate's noisy-val) is built by `budget_refusal`: one line that states the cap, δ
and which events spent what, then an indented list of options whose numbers are computed
(PRV upper bound, as the ledger) so that following one leads to a run that works.
Parameters are named in backticks (`eps`) so the CLI prints them as its flags.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from ..errors import BudgetExhausted
from .accountant import epsilon_upper
from .events import PrivacyEvent

MAX_DESCRIBED = 4  # event groups named in the headline; the rest are counted


@dataclass(frozen=True)
class Shortfall:
    """A refused plan, from public quantities only.

    `target` is the ledger's cap (ε at `delta`); `param` the parameter that set it and `given`
    its value (the cap is `target - given + value`: `eps_query` is spent on top of the
    ledger, `eps` is the whole run's); `param` None: the cap is the run's recorded target.
    `planned` are the stage's events at the most noise it would use (`noise` says which);
    `alone` = (sigma, ε): the noise the planned events get at `given` when nothing else is spent,
    and the ledger's ε with them at that noise (a calibration computes it)."""

    stage: str
    target: float
    delta: float
    spent: tuple[PrivacyEvent, ...]
    planned: tuple[PrivacyEvent, ...]
    what: str
    param: Optional[str] = "eps"
    given: Optional[float] = None
    noise: str = ""
    advice: str = ""
    alone: Optional[tuple[float, float]] = None

    @property
    def already(self) -> float:
        return epsilon_upper(self.spent, self.delta)

    @property
    def least(self) -> float:
        """ε of the ledger with the planned events at the most noise: the least cap that fits them."""
        return epsilon_upper([*self.spent, *self.planned], self.delta)

    @property
    def offset(self) -> float:
        return self.target - (self.target if self.given is None else self.given)

    def value_for(self, cap: float) -> float:
        """The `param` value that sets the ledger's cap to `cap`."""
        return cap - self.offset


def round_up(x: float, digits: int = 3) -> float:
    """x rounded up to `digits` significant digits (never below x): a suggested cap that really fits."""
    if x <= 0:
        return x
    places = digits - 1 - math.floor(math.log10(x))
    r = round(math.ceil(x * 10 ** places) / 10 ** places, max(places, 0))
    return r if r >= x else round(r + 10 ** -places, max(places, 0))


def round_down(x: float, digits: int = 2) -> float:
    """x rounded down to `digits` significant digits (never above x)."""
    if x <= 0:
        return x
    places = digits - 1 - math.floor(math.log10(x))
    r = round(math.floor(x * 10 ** places) / 10 ** places, max(places, 0))
    return r if r <= x else round(r - 10 ** -places, max(places, 0))


def describe_events(events: Sequence[PrivacyEvent]) -> str:
    """"select-public's gaussian σ=1.2, finetune's poisson_gaussian σ=0.61 q=0.125 ×40": events
    with the same stage, mechanism and parameters are merged (their steps add up)."""
    groups: dict[tuple, int] = {}
    for event in events:
        record = event.to_dict()
        key = tuple((k, v) for k, v in record.items() if k not in ("steps", "note"))
        groups[key] = groups.get(key, 0) + event.compositions
    parts = []
    for key, steps in groups.items():
        record = dict(key)
        fields = []
        if "noise_multiplier" in record:
            fields.append(f"σ={record['noise_multiplier']:.4g}")
        if "epsilon0" in record:
            fields.append(f"ε0={record['epsilon0']:.4g}")
        if record.get("sample_rate", 1.0) != 1.0:
            fields.append(f"q={record['sample_rate']:.4g}")
        if "shards" in record:
            fields.append(f"{record['shards']} shards")
        if steps > 1:
            fields.append(f"×{steps}")
        parts.append(f"{record['stage']}'s {record['mechanism']} {' '.join(fields)}".rstrip())
    if len(parts) > MAX_DESCRIBED:
        parts = [*parts[:MAX_DESCRIBED], f"{len(parts) - MAX_DESCRIBED} more"]
    return ", ".join(parts)


def refusal_line(s: Shortfall) -> str:
    """The refusal's one line: the cap, δ, what the run already spent and on what."""
    cap = (f"the target {s.param}={s.given if s.given is not None else s.target:g}" if s.param and s.offset == 0
           else f"`{s.param}`={s.given:g} on top of the ε={s.offset:.3f} spent" if s.param
           else f"the run's target ε={s.target:g}")
    already = s.already
    if s.spent and already >= s.target:
        return (f"{s.stage} cannot run within {cap} (δ={s.delta:.3g}): the run has already spent "
                f"ε={already:.3f} on {describe_events(s.spent)}")
    spent = (f"the run has already spent ε={already:.3f} on {describe_events(s.spent)}, and " if s.spent else "")
    noise = f" even at {s.noise}" if s.noise else ""
    return (f"{s.stage} cannot run within {cap} (δ={s.delta:.3g}): {spent}{s.what} would bring it to "
            f"ε={s.least:.3f}{noise}")


def raise_option(s: Shortfall, *, first: Sequence[str] = ()) -> Optional[str]:
    """"in this run: finetune `eps` 3.92 or more": the least value of the cap's parameter that
    fits the planned events (at the most noise), rounded up so that it really does, and the
    value that gives them the noise `given` would buy them if nothing else were spent.
    `first`: stages this run still needs before the refused one."""
    if not s.param:
        return None
    least = round_up(s.value_for(s.least))
    before = f" {', then '.join(first)}, then" if first else ""
    noise = f", at {s.noise}" if s.noise else ""
    text = f"in this run:{before} {s.stage} `{s.param}` {least:g} or more (the least that fits {s.what}{noise})"
    if s.alone is not None and s.given is not None:
        sigma, eps = s.alone
        text += (f"; `{s.param}` {round_up(s.value_for(eps)):g} gives them noise σ≈{sigma:.3g}, about what "
                 f"`{s.param}` {s.given:g} gives them when nothing else is spent")
    return text


def budget_refusal(s: Shortfall, options: Sequence[Optional[str]], *, headline: Optional[str] = None) -> BudgetExhausted:
    """The refusal: one line (`refusal_line(s)` unless `headline` is given), then each option (None skipped) on
    an indented line."""
    lines = [headline or refusal_line(s), *(f"  - {option}" for option in options if option)]
    return BudgetExhausted("\n".join(lines), shortfall=s)


def default_refusal(s: Shortfall) -> BudgetExhausted:
    """The refusal a calibration raises when no stage adds its own options (library use)."""
    exhausted = bool(s.spent) and s.already >= s.target
    return budget_refusal(s, [raise_option(s), None if exhausted else s.advice,
                              "or start a new run directory whose earlier stages spend less" if s.spent else None])
