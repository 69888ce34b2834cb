"""Stage `finetune`: DP-SGD on the sensitive set, noise calibrated so the WHOLE run fits --eps."""

from __future__ import annotations

import secrets
from pathlib import Path

import torch

from ..errors import BadInput, Interrupted
from ..methods import get_method, parse_arch
from ..privacy.accountant import compose_epsilon
from .rundir import now
from ..training.checkpoint import stop_on_sigint
from ..training.device import resolve_device
from ..training.dp_guards import check_per_sample_gradients
from ..privacy.plans import (PRIVATE_OPTIMIZERS, applied_noise_std, calibrate_private_optimizer,
                             check_private_optimizer, feedback_noise_multiplier, private_optimizer_events,
                             resolve_feedback_clip)
from ..training.dpsgd import (GRAD_SAMPLE_MODES, DPSGDPlan, ExponentialMovingAverage, check_dp_compatible,
                              check_secure_available, train_dp)
from . import checkpoints
from .common import (DataSettings, Progress, check_positive, declared_size, no_progress, open_or_create_run, torch_bytes,
                     torch_load_bytes)
from .names import FINETUNE as STAGE, GENERATOR, PRETRAIN as PRETRAIN_STAGE, PRETRAINED

OPTIONS = ("epochs", "batch_size", "clip", "lr", "grad_sample_mode", "noise_multiplicity", "physical_batch_size",
           "ema", "optimizer", "feedback_clip", "train_opts")


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def check_options(opts: dict) -> None:
    """Each given value on its own (None: not given)."""
    for flag in ("epochs", "batch_size", "noise_multiplicity", "physical_batch_size"):
        if opts.get(flag) is not None:
            check_positive(_flag(flag), opts[flag], integer=True)
    for flag in ("clip", "lr", "feedback_clip"):
        if opts.get(flag) is not None:
            check_positive(_flag(flag), opts[flag])
    if opts.get("optimizer") is not None and opts["optimizer"] not in PRIVATE_OPTIMIZERS:
        raise BadInput(f"--optimizer {opts['optimizer']!r} is unknown; choose one of {', '.join(PRIVATE_OPTIMIZERS)}")
    if opts.get("ema") is not None and not (0.0 < opts["ema"] < 1.0):
        raise BadInput(f"--ema {opts['ema']!r} must be between 0 and 1 (e.g. 0.999)")
    if opts.get("grad_sample_mode") is not None and opts["grad_sample_mode"] not in GRAD_SAMPLE_MODES:
        raise BadInput(f"--grad-sample-mode {opts['grad_sample_mode']!r} is unknown; "
                       f"choose one of {', '.join(GRAD_SAMPLE_MODES)}")


def resolve_options(method_obj, given: dict) -> dict:
    """Explicit options over the method's defaults, then validated. An option the method
    does not have (its key is absent from finetune_defaults) is refused, not ignored."""
    defaults = method_obj.finetune_defaults
    for key in OPTIONS:
        value = given.get(key)
        if value is not None and value != {} and key not in defaults:
            known = ", ".join(_flag(k) for k in OPTIONS if k in defaults)
            raise BadInput(f"method {method_obj.name!r} has no {_flag(key)}; its finetune options: {known}")
    opts = {k: (given.get(k) if given.get(k) is not None else defaults.get(k)) for k in OPTIONS if k in defaults}
    opts["train_opts"] = _train_opts(method_obj, given.get("train_opts"))
    check_options(opts)
    if opts.get("optimizer") == "efsgd" and given.get("grad_sample_mode") is None \
            and opts.get("grad_sample_mode") == "ghost":
        opts["grad_sample_mode"] = "vmap"  # EFSGD needs each example's gradient; ghost was only the default
    if opts.get("grad_sample_mode") == "ghost" and (opts.get("noise_multiplicity") or 1) > 1:
        raise BadInput(f"--grad-sample-mode ghost cannot average --noise-multiplicity {opts['noise_multiplicity']} "
                       f"draws per example; use vmap, hooks or functorch")
    if "optimizer" in opts:
        check_private_optimizer(opts["optimizer"], opts.get("grad_sample_mode"), opts.get("feedback_clip"))
    return opts


def _train_opts(method_obj, given) -> dict:
    """--train-opts k=v,... over the method's own settings; unknown keys are refused."""
    defaults = dict(method_obj.finetune_defaults.get("train_opts") or {})
    given = parse_arch(given, "--train-opts") if given is not None else {}
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        known = ", ".join(sorted(defaults)) or "none"
        raise BadInput(f"--train-opts key {unknown[0]!r} is not a setting of {method_obj.name}; allowed: {known}")
    return {**defaults, **given}


def run_finetune(run_path: str | Path, settings: DataSettings | None = None, *, eps: float,
                 delta: float | None = None, epochs: int | None = None, batch_size: int | None = None,
                 clip: float | None = None, lr: float | None = None, grad_sample_mode: str | None = None,
                 noise_multiplicity: int | None = None, physical_batch_size: int | None = None,
                 ema: float | None = None, optimizer: str | None = None, feedback_clip: float | None = None,
                 train_opts: str | dict | None = None, secure: bool = False, method: str | None = None,
                 arch: str | dict | None = None, device: str | None = None, resume: bool = False,
                 checkpoint_every: int | None = None, progress: Progress = no_progress) -> dict:
    check_positive("--eps", eps)
    check_options({k: v for k, v in locals().items() if k in OPTIONS})  # before any data is read
    if checkpoint_every is not None:
        check_positive("--checkpoint-every", checkpoint_every, integer=True)
    if method is not None:
        _check_method_flags(get_method(method), locals(), resume, checkpoint_every)
    check_secure_available(secure)
    run, sensitive = open_or_create_run(run_path, method=method, settings=settings, delta=delta)
    method_obj = get_method(run.manifest["method"], parse_arch(arch))
    given = {k: v for k, v in locals().items() if k in OPTIONS}
    _check_method_flags(method_obj, given, resume, checkpoint_every)
    if resume:  # the interrupted attempt's recorded options, which its ledger event was solved for
        given = _resume_options(run, eps, given)
    opts = resolve_options(method_obj, given)
    seed = run.manifest["settings"].get("seed", 0)
    torch_device = resolve_device(device)
    if method_obj.own_mechanism:
        return _finetune_own_mechanism(run, sensitive, method_obj, opts, eps=eps, arch=arch, seed=seed,
                                       device=torch_device, progress=progress)

    plan = DPSGDPlan(dataset_size=declared_size(run), batch_size=opts["batch_size"], epochs=opts["epochs"])
    efsgd = opts.get("optimizer") == "efsgd"
    if efsgd:  # its default C2 goes into the recorded config, so --resume reuses it
        opts["feedback_clip"] = resolve_feedback_clip("efsgd", opts.get("feedback_clip"), clip=opts["clip"],
                                                      sample_rate=plan.sample_rate)
    spent = run.events()
    if resume:  # no new event: the ones written before the first step cover all planned steps
        event = checkpoints.resumable_event(run, STAGE, run.manifest["stages"][STAGE]["config"])
        sigma, after = event.noise_multiplier, compose_epsilon(spent, run.delta)
        events = [event]
    else:
        # Solved before anything is written: an over-budget request changes nothing on disk. EFSGD
        # has two events: its error feedback is a hidden state, not subsampled (training/efsgd.py).
        kind, feedback_clip = opts.get("optimizer", "dpsgd"), opts.get("feedback_clip")
        sigma = calibrate_private_optimizer(kind, spent, eps, run.delta, sample_rate=plan.sample_rate,
                                            steps=plan.steps, clip=opts["clip"], feedback_clip=feedback_clip,
                                            stage=STAGE)
        events = private_optimizer_events(kind, STAGE, noise_multiplier=sigma, sample_rate=plan.sample_rate,
                                          steps=plan.steps, clip=opts["clip"], feedback_clip=feedback_clip)
        event = events[-1]  # the PoissonGaussianEvent: checkpoints and --resume are keyed on it
        after = compose_epsilon([*spent, *events], run.delta)
    eps_after = after.upper
    if eps_after > eps:  # calibration guarantees otherwise; checked before anything is written
        raise AssertionError(f"ledger epsilon {eps_after} would exceed target {eps}")

    _, c, r, _ = sensitive.images.shape
    torch.manual_seed(seed)
    generator, inputs = _starting_generator(run, sensitive, method_obj, arch)
    check_dp_compatible(generator)
    # vmap computes each example alone: nothing can mix. A resumed run's model passed this check
    # before its event was recorded.
    if opts["grad_sample_mode"] != "vmap" and not resume:
        # Random inputs of the sensitive set's shape: the check reads no sensitive data.
        probe = torch.Generator().manual_seed(0)
        check_per_sample_gradients(generator, torch.randint(0, 256, (2, c, r, r), dtype=torch.uint8, generator=probe),
                                   torch.randint(0, sensitive.num_classes, (2,), generator=probe),
                                   method_obj.per_sample_loss)
    generator.to(torch_device)
    ema_tracker = ExponentialMovingAverage(generator, opts["ema"]) if opts["ema"] else None

    config = {"eps": eps, "delta": run.delta, **opts, "secure": secure, "noise_multiplier": sigma,
              "sample_rate": plan.sample_rate, "steps": plan.steps, "device": str(torch_device),
              "parameters": sum(p.numel() for p in generator.parameters()), "generator": generator.cfg.to_dict()}
    if efsgd:
        config["noise_std"] = applied_noise_std(sigma, opts["clip"])  # on the clipped sum, before / batch
        config["feedback_noise_multiplier"] = feedback_noise_multiplier(sigma, opts["clip"], opts["feedback_clip"])
    with run.lock():
        if resume:
            state = checkpoints.load_checkpoint(run, STAGE, event)  # sha256, run and event checked
            entry = run.manifest["stages"][STAGE]
            entry["status"] = "running"
            entry.setdefault("resumed", []).append({"time": now(), "from_step": state["step"] if state else 0})
            run.save()
        else:
            state = None
            checkpoints.discard_all(run, STAGE)  # an earlier attempt's checkpoints belong to its own event
            run.begin_stage(STAGE, config, inputs=inputs)
            run.manifest["privacy"]["target_epsilon"] = float(eps)
            for i, planned in enumerate(events):  # write-ahead: before any noisy step
                run.record_event(planned, compose_epsilon([*spent, *events[:i + 1]], run.delta))
        # Batch sampling and noise must be secret: reseed from OS entropy, not the recorded seed
        # (a resumed run restores the checkpoint's RNG state instead).
        torch.manual_seed(secrets.randbits(63))
        try:
            with stop_on_sigint() as stop:
                trained = train_dp(generator, sensitive.images, sensitive.labels, method_obj.per_sample_loss,
                                   plan=plan, noise_multiplier=sigma, clip=opts["clip"], lr=opts["lr"],
                                   grad_sample_mode=opts["grad_sample_mode"], secure=secure,
                                   noise_multiplicity=opts["noise_multiplicity"],
                                   physical_batch_size=opts["physical_batch_size"], ema=ema_tracker,
                                   private_optimizer=opts["optimizer"], feedback_clip=opts["feedback_clip"],
                                   progress=lambda d, t, _l: progress("finetune (DP-SGD)", d, t), resume=state,
                                   on_step=checkpoints.Checkpointer(run, STAGE, event, checkpoint_every, stop))
        except Interrupted:
            run.end_stage(STAGE, status="interrupted")
            raise
        except BaseException:
            run.end_stage(STAGE, status="failed")
            raise
        trained = trained.cpu()
        payload = {"state_dict": trained.state_dict(), "config": trained.cfg.to_dict()}
        if ema_tracker is not None:
            payload["ema_state_dict"] = {k: v.cpu() for k, v in ema_tracker.state_dict().items()}
        run.write_artifact(STAGE, GENERATOR, torch_bytes(payload))
        run.end_stage(STAGE)
        checkpoints.discard_all(run, STAGE)  # after completion: until then they are the way back
    result = {"epsilon_spent": eps_after, "target_epsilon": eps, "delta": run.delta, "noise_multiplier": sigma,
              "sample_rate": plan.sample_rate, "steps": plan.steps, "method": method_obj.name}
    if efsgd:
        result.update(optimizer="efsgd", feedback_clip=opts["feedback_clip"], noise_std=config["noise_std"])
    return result


def _check_method_flags(method_obj, given: dict, resume: bool, checkpoint_every) -> None:
    resolve_options(method_obj, given)
    if method_obj.own_mechanism and (resume or checkpoint_every is not None):
        flag = "--resume" if resume else "--checkpoint-every"
        raise BadInput(f"method {method_obj.name!r} trains with its own mechanism, which has no checkpoints; "
                       f"drop {flag}")


def _starting_generator(run, sensitive, method_obj, arch):
    """The pretrained generator when the method has a pretrain stage, else a fresh one."""
    if method_obj.uses_pretrain_stage:
        run.require_stage(PRETRAIN_STAGE, STAGE)
        state = torch_load_bytes(run.read_artifact(PRETRAINED))
        if arch:
            raise BadInput(f"--arch is fixed by the pretrain stage ({state['config']}); drop --arch")
        generator = method_obj.generator_from_config(state["config"])
        generator.load_state_dict(state["state_dict"])
        return generator, [PRETRAINED]
    _, c, r, _ = sensitive.images.shape
    return method_obj.build_generator(r, c, sensitive.num_classes), []


def _finetune_own_mechanism(run, sensitive, method_obj, opts: dict, *, eps: float, arch, seed: int, device,
                            progress) -> dict:
    """A method's own mechanism (GANs, mean embeddings): its planned events are calibrated and
    checked before anything is written, recorded before it runs, and it must run exactly them."""
    spent = run.events()
    plan = method_obj.plan_private(dataset_size=declared_size(run), opts=opts, spent=spent, eps=eps, delta=run.delta)
    if not plan.events:
        raise AssertionError(f"{method_obj.name} planned no privacy event but reads the sensitive set")
    after = compose_epsilon([*spent, *plan.events], run.delta)
    if after.upper > eps:  # calibration guarantees otherwise; checked before anything is written
        raise AssertionError(f"ledger epsilon {after.upper} would exceed target {eps}")
    torch.manual_seed(seed)
    generator, inputs = _starting_generator(run, sensitive, method_obj, arch)
    config = {"eps": eps, "delta": run.delta, **opts, **plan.settings, "device": str(device),
              "parameters": sum(p.numel() for p in generator.parameters()), "generator": generator.cfg.to_dict()}
    with run.lock():
        checkpoints.discard_all(run, STAGE)
        run.begin_stage(STAGE, config, inputs=inputs)
        run.manifest["privacy"]["target_epsilon"] = float(eps)
        for i, event in enumerate(plan.events):  # write-ahead: before any release exists
            run.record_event(event, compose_epsilon([*spent, *plan.events[:i + 1]], run.delta))
        torch.manual_seed(secrets.randbits(63))  # sampling and noise must be secret
        try:  # no checkpoints here: Ctrl-C stops at once and the stage is marked failed
            trained = method_obj.train_private(generator.to(device), sensitive.images, sensitive.labels,
                                               opts=opts, plan=plan, device=device, progress=progress)
        except BaseException:
            run.end_stage(STAGE, status="failed")
            raise
        trained = trained.cpu()
        run.write_artifact(STAGE, GENERATOR, torch_bytes({"state_dict": trained.state_dict(),
                                                          "config": trained.cfg.to_dict()}))
        run.end_stage(STAGE)
    return {"epsilon_spent": after.upper, "target_epsilon": eps, "delta": run.delta, "method": method_obj.name,
            "events": [e.to_dict() for e in plan.events],
            **{k: v for k, v in plan.settings.items() if isinstance(v, (int, float, str))}}


def _resume_options(run, eps: float, given: dict) -> dict:
    """--resume continues the recorded configuration; a flag that contradicts it is refused."""
    entry = run.manifest["stages"].get(STAGE)
    if entry is None:
        raise BadInput(f"--resume: there is no interrupted finetune in {run.path}; drop --resume")
    recorded = entry["config"]
    if float(eps) != float(recorded["eps"]):
        raise BadInput(f"--resume: --eps {eps:g} differs from the interrupted run's --eps {recorded['eps']:g}")
    for key, value in given.items():
        if value is not None and value != recorded.get(key):
            flag = "--" + key.replace("_", "-")
            raise BadInput(f"--resume: {flag} {value!r} differs from the interrupted run's {recorded.get(key)!r}; "
                           f"drop {flag}")
    return {k: recorded.get(k) for k in OPTIONS if k in recorded}
