"""Checkpoints of the `finetune` stage in the run directory, and the rules for resuming.

A checkpoint is an artifact like any other: written atomically under a new name
(`checkpoint-<step>.pt`), recorded with its sha256 in the manifest, and only then is the
previous one deleted, so a crash at any point leaves one complete, verifiable checkpoint.
Its payload names the run and the privacy events it belongs to (the finetune attempt's
recorded events, whatever their mechanisms); `--resume` refuses a checkpoint of another run
or other events. Resuming never writes a new privacy event: the events recorded before the
first step already cover every planned step. Checkpoints hold secrets (the RNG state, and
e.g. GS-WGAN's shard assignment and discriminators), so they are deleted when the stage
completes.
An attempt killed before its first checkpoint left nothing durable from its steps (they
lived in memory only), so resuming it starts again from step 0 under the same event.
"""

from __future__ import annotations

from typing import Sequence

from ..errors import BadInput, IntegrityError, Interrupted
from ..privacy.events import PrivacyEvent, event_from_dict
from ..training import distributed
from ..training.checkpoint import Checkpointing
from .rundir import RunDir
from .names import CHECKPOINT_PREFIX
from .common import torch_bytes, torch_load_bytes

PREFIX = CHECKPOINT_PREFIX
RESUMABLE = ("running", "failed", "interrupted")


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:07d}.pt"


class Checkpointer(Checkpointing):
    """The stage's `Checkpointing` for every trainer: continues from `resume`, saves every
    `every` steps, when a stop was requested, and after the last of `total` steps (so a crash
    while the generator is written resumes by exporting that final state again, never by
    training a second model under the same events).

    Under torchrun every rank has one, built alike; only rank 0's has the `run` and writes.
    The ranks agree at each step on whether to stop (a Ctrl-C may reach them at different
    steps), and a checkpoint holds every rank's RNG state ("rank_rng")."""

    def __init__(self, run: RunDir | None, stage: str, events: Sequence[PrivacyEvent], total: int,
                 every: int | None, stop=None, resume: dict | None = None):
        super().__init__(resume=resume)
        self.run, self.stage, self.events, self.total, self.every, self.stop = run, stage, events, total, every, stop

    def __call__(self, step: int, snapshot) -> None:
        requested = distributed.any_rank(self.stop is not None and self.stop.requested)
        stopping = requested and step < self.total
        if stopping or step == self.total or (self.every and step % self.every == 0):
            state = snapshot()
            # A collective: every rank takes part. Methods with their own mechanism (e.g. PE)
            # run in one process and may keep no "rng" in their state.
            ranks_rng = distributed.gather_objects(state["rng"]) if distributed.active() else None
            if ranks_rng is not None:
                state["rank_rng"] = ranks_rng
            if self.run is not None:
                self.save(step, state)
        if stopping:
            where = self.run.path if self.run is not None else "<run>"
            processes = f" --nproc {distributed.world_size()}" if distributed.active() else ""
            raise Interrupted(f"finetune stopped after step {step} of {self.total}; checkpoint written. "
                              f"Continue with: dpsynth finetune --run {where} --resume --eps <the same eps>"
                              f"{processes}", step, self.total)

    def save(self, step: int, state: dict) -> None:
        payload = {"run_id": self.run.manifest["run_id"], "events": events_key(self.events), "state": state}
        name = checkpoint_name(step)
        self.run.write_artifact(self.stage, name, torch_bytes(payload))  # file, then manifest
        entry = self.run.manifest["stages"][self.stage]
        previous = entry.get("checkpoint")
        entry["checkpoint"] = {"name": name, "step": step}
        self.run.save()
        if previous and previous["name"] != name:
            forget(self.run, self.stage, previous["name"])


def forget(run: RunDir, stage: str, name: str) -> None:
    """Drop a checkpoint from the manifest first, then from disk."""
    run.manifest["artifacts"].pop(name, None)
    run.manifest["stages"].get(stage, {}).get("outputs", {}).pop(name, None)
    run.save()
    run.artifact_path(name).unlink(missing_ok=True)


def discard_all(run: RunDir, stage: str) -> None:
    """Remove every checkpoint (recorded or orphaned by a crash) once they are of no use."""
    entry = run.manifest["stages"].get(stage, {})
    changed = entry.pop("checkpoint", None) is not None
    names = [n for n in run.manifest["artifacts"] if n.startswith(PREFIX)]
    for name in names:
        forget(run, stage, name)  # saves the manifest
    if changed and not names:
        run.save()
    for path in run.path.glob(f"{PREFIX}*.pt"):
        path.unlink(missing_ok=True)


def resumable_events(run: RunDir, stage: str, config: dict) -> tuple[PrivacyEvent, ...]:
    """The ledger events the interrupted attempt recorded before its first step: those after
    the `events_before` it started on, which must be exactly the ones it planned."""
    entry = run.manifest["stages"].get(stage)
    if entry is None or entry.get("status") not in RESUMABLE:
        status = "absent" if entry is None else entry.get("status")
        raise BadInput(f"`resume`: there is no interrupted finetune in {run.path} (stage is {status}); "
                       f"drop `resume`")
    planned = [event_from_dict(e) for e in config.get("events", [])]
    recorded = tuple(run.events()[int(config.get("events_before", 0)):])
    if not planned or events_key(recorded) != events_key(planned) or any(e.stage != stage for e in recorded):
        raise BadInput(f"`resume`: the interrupted finetune in {run.path} never recorded its privacy event, so no "
                       f"private step ran; drop `resume` to start it again")
    return recorded


def load_checkpoint(run: RunDir, stage: str, events: Sequence[PrivacyEvent], total: int) -> dict | None:
    """The recorded checkpoint's training state (sha256-verified and checked to belong to
    this run and these events), or None if the attempt stopped before its first checkpoint."""
    record = run.manifest["stages"][stage].get("checkpoint")
    if record is None:
        return None
    payload = torch_load_bytes(run.read_artifact(record["name"]))  # refuses a changed file by name
    if payload.get("run_id") != run.manifest["run_id"] or payload.get("events") != events_key(events):
        raise IntegrityError(f"checkpoint {run.artifact_path(record['name'])} belongs to another run or privacy "
                             f"event (run {payload.get('run_id')!r}); refusing to resume from it")
    if payload["state"]["step"] != record["step"] or not (0 < record["step"] <= total):
        raise IntegrityError(f"checkpoint {record['name']} is at step {payload['state']['step']}, "
                             f"the manifest says {record['step']} of {total}")
    return payload["state"]


def events_key(events: Sequence[PrivacyEvent]) -> list[dict]:
    """What identifies the events (their accounting fields; notes and times excluded)."""
    return [{k: v for k, v in e.to_dict().items() if k != "note"} for e in events]
