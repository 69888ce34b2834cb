"""One stage lifecycle for all five stages.

    with stage_run(run, STAGE, config, inputs=[...], events=planned):
        ...  # the stage's work: mechanisms, artifacts

Under the run's lock it records the stage as running, writes the planned privacy events
(write-ahead: before any output of their mechanisms exists), reseeds the global RNG from
OS entropy when a mechanism will run, and ends the stage `completed`, `interrupted`
(Ctrl-C at a step boundary) or `failed` (any other exception): never left `running`. An
event recorded before a failure stays in the ledger: the access happened.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

from ..errors import Interrupted
from ..mechanisms.secret_noise import reseed_global_rng
from ..privacy.accountant import compose_epsilon
from ..privacy.events import PrivacyEvent
from .rundir import RunDir, now


def record_events(run: RunDir, events: Sequence[PrivacyEvent]) -> None:
    """Append `events` to the ledger, each with the epsilon of everything up to it, each saved."""
    spent = run.events()
    for i, event in enumerate(events):
        run.record_event(event, compose_epsilon([*spent, *events[:i + 1]], run.delta))


@contextlib.contextmanager
def stage_run(run: RunDir, stage: str, config: dict, *, inputs: Sequence[str] = (),
              events: Sequence[PrivacyEvent] = (), target_epsilon: float | None = None,
              resumed_from: int | None = None, started: str | None = None) -> Iterator[RunDir]:
    """`resumed_from`: continue an interrupted stage from this step under the events it already
    recorded (no new begin, no new event); the stage's entry says when and from where. `started`:
    when the stage's work began, if before this call (`rundir.now()` then); default now."""
    with run.lock():
        if resumed_from is None:
            run.begin_stage(stage, config, inputs=list(inputs), started=started)
        else:
            entry = run.manifest["stages"][stage]
            entry["status"] = "running"
            entry.setdefault("resumed", []).append({"time": now(), "from_step": int(resumed_from)})
            run.save()
        if target_epsilon is not None:
            run.manifest["privacy"]["target_epsilon"] = float(target_epsilon)
        try:
            record_events(run, events)
            if events or resumed_from is not None:
                # Sampling and noise must be secret (a resumed stage restores its checkpoint's RNG state).
                reseed_global_rng()
            yield run
        except Interrupted:
            run.end_stage(stage, status="interrupted")
            raise
        except BaseException:
            run.end_stage(stage, status="failed")
            raise
        run.end_stage(stage)
