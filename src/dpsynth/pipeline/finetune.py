"""Stage `finetune`: the method's private training on the sensitive set, noise calibrated so
that the WHOLE run fits `eps`.

One flow for every method (DP-SGD is the base `Method`'s plan and trainer; GANs and mean
embeddings override them):
1. the options are resolved against the method's defaults (`training.options`): once before
   any data is read (so a bad option is refused first), and again with the declared N once the
   run is open, so that defaults the user did not set are adapted to a small N before planning;
2. `method.plan_private` calibrates the ledger events and settings, before anything is
   written (an over-budget request changes nothing on disk); on `resume` the plan is
   rebuilt from the interrupted attempt's recorded settings and its recorded events;
3. `stage_run` records the stage and the events (write-ahead), reseeds from OS entropy;
4. `method.train_private` runs exactly the planned mechanisms, checkpointing through one
   `Checkpointer` (iterative methods); the generator is written, checkpoints deleted.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import BadInput, PeerStopped
from ..methods import get_method, parse_arch
from ..methods.base import PrivatePlan
from ..privacy.accountant import compose_epsilon
from ..progress import Progress, no_progress
from ..mechanisms.secret_noise import reseed_global_rng
from ..training import distributed
from ..training.checkpoint import stop_on_sigint
from ..training.device import resolve_device
from ..training.dpsgd import check_secure_available
from ..training.options import FinetuneOptions, check_values, resolve_options
from ..validation import check_positive
from . import checkpoints
from .budget_advice import run_budget_options
from .common import (DataSettings, declared_size, open_or_create_run, settings_from_run, torch_bytes,
                     torch_load_bytes)
from .lifecycle import stage_run
from .names import FINETUNE as STAGE, GENERATOR, PRETRAIN as PRETRAIN_STAGE, PRETRAINED
from .rundir import RunDir

DEFAULT_METHOD = "privimage-cvae"


def run_finetune(run_path: str | Path, settings: DataSettings | None = None, *, eps: float,
                 options: FinetuneOptions = FinetuneOptions(), delta: float | None = None, method: str | None = None,
                 arch: str | dict | None = None, device: str | None = None, resume: bool = False,
                 checkpoint_every: int | None = None, progress: Progress = no_progress) -> dict:
    """Under torchrun (WORLD_SIZE > 1), rank 0 runs the stage as one process would and, once
    the ledger event is written, hands the training job to the other ranks; they never open
    the run directory (`training.distributed`). They return {"rank": r} and write nothing."""
    if distributed.init_from_env(device) and not distributed.is_main():
        return _follow_rank0(device)
    handoff = _Handoff()
    try:
        return _run_finetune(run_path, settings, eps=eps, options=options, delta=delta, method=method, arch=arch,
                             device=device, resume=resume, checkpoint_every=checkpoint_every, progress=progress,
                             handoff=handoff)
    except BaseException:
        handoff.abort()  # the other ranks, still waiting for the job, stop too
        raise


class _Handoff:
    """Rank 0's one message to the other ranks: the training job, or None if it stopped first."""

    def __init__(self) -> None:
        self.sent = False

    def send(self, job: dict) -> None:
        distributed.broadcast_object(job)
        self.sent = True

    def abort(self) -> None:
        if distributed.active() and not self.sent:
            self.sent = True
            distributed.broadcast_object(None)


def _follow_rank0(device: str | None) -> dict:
    """Ranks > 0: train on rank 0's job (its generator, data, plan and checkpoint) with their
    own shard and their own secret randomness; rank 0 writes everything."""
    job = distributed.broadcast_object()
    if job is None:
        raise PeerStopped("rank 0 stopped before training (it says why)")
    reseed_global_rng()  # this rank's Poisson sampling: secret, and independent of the others'
    torch_device = resolve_device(device)
    with stop_on_sigint() as stop:
        saver = checkpoints.Checkpointer(None, STAGE, job["plan"].events, job["total"], job["every"], stop,
                                         resume=job["resume"])
        job["method"].train_private(job["generator"].to(torch_device), job["images"], job["labels"],
                                    opts=job["opts"], plan=job["plan"], device=torch_device, progress=no_progress,
                                    checkpoints=saver)
    return {"rank": distributed.rank()}


def _run_finetune(run_path, settings, *, eps, options, delta, method, arch, device, resume, checkpoint_every,
                  progress, handoff: _Handoff) -> dict:
    # Everything that can be refused is refused before any data is read or anything is written.
    check_positive("eps", eps)
    check_values(options)
    if checkpoint_every is not None:
        check_positive("checkpoint_every", checkpoint_every, integer=True)
    check_secure_available(options.secure, resolve_device(device))
    existing = RunDir.open(run_path) if RunDir.exists(run_path) else None
    method_name = method or (existing.manifest["method"] if existing else DEFAULT_METHOD)
    method_obj = get_method(method_name, parse_arch(arch))
    if not method_obj.iterative and (resume or checkpoint_every is not None):
        name = "resume" if resume else "checkpoint_every"
        raise BadInput(f"method {method_obj.name!r} makes one release, which has no checkpoints; drop `{name}`")
    processes = distributed.world_size()
    distributed.check_method(method_obj, processes)
    recorded = _interrupted_config(existing, run_path, eps, options) if resume else None
    if resume and recorded.get("processes", 1) != processes:
        raise BadInput(f"`resume`: the interrupted finetune ran in {recorded.get('processes', 1)} process(es) and "
                       f"continues only in as many (each one's sampling state is in the checkpoint); "
                       f"resume with `nproc` {recorded.get('processes', 1)}, not {processes}")
    opts = resolve_options(method_obj, FinetuneOptions.from_record(recorded) if resume else options)

    run, sensitive = open_or_create_run(run_path, method=method, settings=settings, delta=delta)
    if not resume:  # N is public (declared); the plan below is calibrated on these final options
        opts = resolve_options(method_obj, options, dataset_size=declared_size(run))
    spent = run.events()
    if resume:  # no new event: the ones written before the first step cover all planned steps
        events = checkpoints.resumable_events(run, STAGE, recorded)
        plan = PrivatePlan(events=events, settings=dict(recorded["plan"]))
        ledger = spent
    else:
        with run_budget_options(run, method_obj, STAGE):  # a refusal names what would fit, in this run or a new one
            plan = method_obj.plan_private(dataset_size=declared_size(run), opts=opts, spent=spent, eps=eps,
                                           delta=run.delta)
        if not plan.events:
            raise AssertionError(f"{method_obj.name} planned no privacy event but reads the sensitive set")
        ledger = [*spent, *plan.events]
    after = compose_epsilon(ledger, run.delta)
    if after.upper > eps:  # calibration guarantees otherwise; checked before anything is written
        raise AssertionError(f"ledger epsilon {after.upper} would exceed target {eps}")

    torch_device = resolve_device(device)
    if method_obj.uses_feature_network:  # public data only (cached); named in the stage's config
        from .evaluate import feature_network

        method_obj.feature_network = feature_network(run, settings_from_run(run), None, None, torch_device)
    _, c, r, _ = sensitive.images.shape
    torch.manual_seed(run.manifest["settings"].get("seed", 0))  # model init only; noise is reseeded below
    if resume and not method_obj.uses_pretrain_stage:  # the architecture the checkpoint was trained with
        generator, inputs = method_obj.generator_from_config(recorded["generator"]), []
    else:
        generator, inputs = _starting_generator(run, sensitive, method_obj, arch)
    generator = method_obj.prepare_private(generator, opts)
    if not resume:  # a resumed run's generator passed this before its events were recorded
        method_obj.check_generator(generator, channels=c, resolution=r, num_classes=sensitive.num_classes, opts=opts)
    total = method_obj.private_steps(plan) if method_obj.iterative else None
    config = {"eps": eps, "delta": run.delta, **opts.record(), "device": str(torch_device),
              **_scalars(plan.settings), "plan": plan.settings, "events": [e.to_dict() for e in plan.events],
              "events_before": len(spent), "parameters": sum(p.numel() for p in generator.parameters()),
              "trainable_parameters": sum(p.numel() for p in generator.parameters() if p.requires_grad),
              "generator": generator.cfg.to_dict()}
    if opts.notes:
        config["option_notes"] = list(opts.notes)
    if opts.adapted:
        config["adapted_to_size"] = _adapted(opts, declared_size(run))
    if processes > 1:
        config["processes"] = processes
    if method_obj.uses_feature_network:
        config["feature_network"] = method_obj.feature_network.name
    saved = (run.manifest["stages"][STAGE].get("checkpoint") or {}).get("step", 0) if resume else None
    with stage_run(run, STAGE, config, inputs=inputs, events=() if resume else plan.events, target_epsilon=eps,
                   resumed_from=saved):
        if resume:  # sha256, run and events checked
            state = checkpoints.load_checkpoint(run, STAGE, plan.events, total)
        else:
            state = None
            checkpoints.discard_all(run, STAGE)  # an earlier attempt's checkpoints belong to its own events
        if processes > 1:  # after the write-ahead: no rank can take a step before the event exists
            handoff.send({"method": method_obj, "generator": generator, "images": sensitive.images,
                          "labels": sensitive.labels, "opts": opts, "plan": plan, "total": total,
                          "every": checkpoint_every, "resume": state})
        with stop_on_sigint() as stop:
            saver = (checkpoints.Checkpointer(run, STAGE, plan.events, total, checkpoint_every, stop, resume=state)
                     if total is not None else None)
            trained = method_obj.train_private(generator.to(torch_device), sensitive.images, sensitive.labels,
                                               opts=opts, plan=plan, device=torch_device, progress=progress,
                                               checkpoints=saver)
        model = trained.generator.cpu()
        payload = {"state_dict": model.state_dict(), "config": model.cfg.to_dict()}
        if trained.ema_state_dict is not None:
            payload["ema_state_dict"] = {k: v.cpu() for k, v in trained.ema_state_dict.items()}
        run.write_artifact(STAGE, GENERATOR, torch_bytes(payload))
    with run.lock():
        checkpoints.discard_all(run, STAGE)  # after completion: until then they are the way back
    result = {"epsilon_spent": after.upper, "target_epsilon": eps, "delta": run.delta, "method": method_obj.name,
              "events": [e.to_dict() for e in plan.events], **_scalars(plan.settings)}
    if opts.private_optimizer is not None:
        result["private_optimizer"] = opts.private_optimizer
    if opts.notes:
        result["option_notes"] = list(opts.notes)
    if opts.adapted:
        result["adapted_to_size"] = _adapted(opts, declared_size(run))
    return result


def _adapted(opts: FinetuneOptions, dataset_size: int) -> dict:
    """{dataset_size, option: {default, used}} of the defaults adapted to N (the used values are
    also the recorded options themselves)."""
    return {"dataset_size": dataset_size, **{k: {"default": old, "used": new} for k, old, new in opts.adapted}}


def _scalars(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if isinstance(v, (int, float, str))}


def _starting_generator(run, sensitive, method_obj, arch):
    """The pretrained generator when the method has a pretrain stage, else a fresh one."""
    if method_obj.uses_pretrain_stage:
        run.require_stage(PRETRAIN_STAGE, STAGE)
        state = torch_load_bytes(run.read_artifact(PRETRAINED))
        if arch:
            raise BadInput(f"`arch` is fixed by the pretrain stage ({state['config']}); drop `arch`")
        generator = method_obj.generator_from_config(state["config"])
        generator.load_state_dict(state["state_dict"])
        return generator, [PRETRAINED]
    _, c, r, _ = sensitive.images.shape
    return method_obj.build_generator(r, c, sensitive.num_classes), []


def _interrupted_config(run: RunDir | None, run_path, eps: float, given: FinetuneOptions) -> dict:
    """`resume` continues the recorded configuration; an option that contradicts it is refused."""
    entry = run.manifest["stages"].get(STAGE) if run is not None else None
    if entry is None or "plan" not in entry["config"]:
        raise BadInput(f"`resume`: there is no interrupted finetune in {run_path}; drop `resume`")
    recorded = entry["config"]
    if float(eps) != float(recorded["eps"]):
        raise BadInput(f"`resume`: eps={eps:g} differs from the interrupted run's {recorded['eps']:g}")
    asked = given.given()
    if given.secure:
        asked["secure"] = True
    for key, value in asked.items():
        if key == "train_opts":  # each given setting must be the recorded one
            parsed = parse_arch(value, "`train_opts`")
            value = {**recorded.get(key, {}), **parsed}
        if value != recorded.get(key):
            raise BadInput(f"`resume`: {key}={value!r} differs from the interrupted run's {recorded.get(key)!r}; "
                           f"drop `{key}`")
    return recorded
