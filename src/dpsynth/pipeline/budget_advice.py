"""A stage's budget refusal with this run's own options (the message: `privacy.refusal`).

`run_budget_options(run, method, stage)` wraps a stage's planning; when its calibration
cannot fit, the refusal is rebuilt with (a) the least cap in this run, naming the stages the
run still needs first, and (b) how a new run directory keeps the target: the earlier stages
that would run again, with select-public's query resized (`eps_query` X, or the `sigma` Y
whose query ε is X) so the planned events fit, computed at this run's δ for its declared N.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

from ..errors import BudgetExhausted
from ..mechanisms.noisy_val import RESERVED
from ..privacy.accountant import epsilon_upper
from ..privacy.events import GaussianEvent, PrivacyEvent
from ..privacy.plans import gaussian_release_sigma
from ..privacy.refusal import Shortfall, budget_refusal, describe_events, raise_option, round_down, round_up
from .names import EVALUATE, FINETUNE, GENERATE, PRETRAIN, SELECT_PUBLIC
from .rundir import RunDir

# Shares of the target tried, in turn, for the resized query of a new run: most of the budget
# stays with fine-tuning (PrivImage spends a small part of it on the query).
QUERY_SHARES = (0.1, 0.05, 0.02)


def method_stages(method) -> list[str]:
    """The stages a run of `method` goes through, in order."""
    return [*([SELECT_PUBLIC] if method.uses_public_selection else []),
            *([PRETRAIN] if method.uses_pretrain_stage else []), FINETUNE, GENERATE, EVALUATE]


def _spending(method, stage: str) -> bool:
    return stage == SELECT_PUBLIC or (stage == PRETRAIN and method.uses_central_warmup)


@contextlib.contextmanager
def run_budget_options(run: RunDir, method, stage: str) -> Iterator[None]:
    try:
        yield
    except BudgetExhausted as exc:
        if exc.shortfall is None:
            raise
        raise refusal_for_run(exc.shortfall, run, method) from None


def refusal_for_run(s: Shortfall, run: RunDir, method) -> BudgetExhausted:
    stages = method_stages(method)
    before = stages[:stages.index(s.stage)] if s.stage in stages else []
    missing = [st for st in before if not run.stage_done(st)]
    exhausted = bool(s.spent) and s.already >= s.target
    here = raise_option(s, first=missing)
    unpaid = [st for st in missing if _spending(method, st)]
    if here and unpaid:
        here += f", plus what {' and '.join(unpaid)} will spend"
    return budget_refusal(s, [here, new_run_option(s, run, method, before),
                              None if exhausted or not s.advice else f"or, in either: {s.advice}"])


def _recorded_query(run: RunDir) -> str:
    config = (run.manifest["stages"].get(SELECT_PUBLIC) or {}).get("config") or {}
    if config.get("eps_query") is not None:
        return f"`eps_query` {config['eps_query']:g}"
    return f"`sigma` {config['sigma']:g}" if config.get("sigma") is not None else "its earlier setting"


def new_run_option(s: Shortfall, run: RunDir, method, before: Sequence[str]) -> Optional[str]:
    """"keep `eps` 1: in a new `run` directory ...": the sequence of stages to run there, with
    numbers checked to fit (None when the cap is not a parameter of this stage)."""
    if s.param is None or s.given is None or s.offset != 0:
        return None
    keep = f"keep `{s.param}` {s.given:g}"
    # What a new run spends again: the earlier stages' events and the reservation made at creation.
    again = [e for e in s.spent if e.stage in before or RESERVED in getattr(e, "note", "")]
    queries = [e for e in again if e.stage == SELECT_PUBLIC]
    fixed = [e for e in again if e.stage != SELECT_PUBLIC]
    then = [f"{st}" for st in before if st != SELECT_PUBLIC] + [f"{s.stage} `{s.param}` {s.given:g}"]
    where = "in a new `run` directory with the same dataset flags"
    if not queries:
        if epsilon_upper([*fixed, *s.planned], s.delta) <= s.target:
            return f"{keep}: {where}, run {', then '.join([*before, then[-1]])}"
        return _no_new_run(s, keep, fixed)
    for share in QUERY_SHARES:
        resized = _resized_query(s, fixed, round_down(share * s.given))
        if resized is not None:
            x, y = resized
            return (f"{keep}: {where}, run select-public `eps_query` {x:g} (or `sigma` {y:g}) instead of "
                    f"{_recorded_query(run)}, then {', then '.join(then)}")
    return _no_new_run(s, keep, fixed)


def _resized_query(s: Shortfall, fixed: list[PrivacyEvent], x: float) -> Optional[tuple[float, float]]:
    """(x, y) when a query spending `eps_query` x (select-public's own calibration, after the
    events made at creation), and one at `sigma` y (the query alone worth x, rounded up), each
    leave room for the planned events at the most noise; None otherwise."""
    created = [e for e in fixed if RESERVED in getattr(e, "note", "")]
    try:
        by_eps = gaussian_release_sigma(created, epsilon_upper(created, s.delta) + x, s.delta, stage=SELECT_PUBLIC)
        y = round_up(gaussian_release_sigma([], x, s.delta, stage=SELECT_PUBLIC))
    except BudgetExhausted:  # x is below what the most noise calibration tries can reach
        return None
    for sigma in (by_eps, y):
        if epsilon_upper([*fixed, GaussianEvent(SELECT_PUBLIC, sigma), *s.planned], s.delta) > s.target:
            return None
    return x, y


def _no_new_run(s: Shortfall, keep: str, fixed: list[PrivacyEvent]) -> str:
    others = f" with {describe_events(fixed)}" if fixed else ""
    cheaper = f": {s.advice}" if s.advice else ""
    return (f"{keep}: not possible in a new run either, {s.what}{others} need more than ε={s.target:g}"
            f"{cheaper}")
