"""Stage `finetune`: DP-SGD on the sensitive set, noise calibrated so the WHOLE run fits --eps."""

from __future__ import annotations

import secrets
from pathlib import Path

import torch

from ..errors import BadInput
from ..methods import get_method
from ..privacy.accountant import calibrate_noise_multiplier, compose_epsilon
from ..privacy.events import PoissonGaussianEvent
from ..training.dpsgd import GRAD_SAMPLE_MODES, DPSGDPlan, check_dp_compatible, check_secure_available, train_dp
from .common import (DataSettings, Progress, check_positive, no_progress, open_or_create_run, torch_bytes,
                     torch_load_bytes)
from .pretrain import PRETRAINED, STAGE as PRETRAIN_STAGE

STAGE = "finetune"
GENERATOR = "generator.pt"


def run_finetune(run_path: str | Path, settings: DataSettings | None = None, *, eps: float,
                 delta: float | None = None, epochs: int = 2, batch_size: int = 512, clip: float = 1.0,
                 lr: float = 1e-3, grad_sample_mode: str = "ghost", secure: bool = False,
                 method: str | None = None, progress: Progress = no_progress) -> dict:
    check_positive("--eps", eps)
    check_positive("--epochs", epochs, integer=True)
    check_positive("--batch-size", batch_size, integer=True)
    check_positive("--clip", clip)
    check_positive("--lr", lr)
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise BadInput(f"--grad-sample-mode {grad_sample_mode!r} is unknown; choose one of {', '.join(GRAD_SAMPLE_MODES)}")
    check_secure_available(secure)
    run, sensitive = open_or_create_run(run_path, method=method, settings=settings, delta=delta)
    method_obj = get_method(run.manifest["method"])
    seed = run.manifest["settings"].get("seed", 0)

    plan = DPSGDPlan(dataset_size=len(sensitive), batch_size=batch_size, epochs=epochs)
    spent = run.events()
    # Solved before anything is written: an over-budget request changes nothing on disk.
    sigma = calibrate_noise_multiplier(spent, eps, run.delta, sample_rate=plan.sample_rate, steps=plan.steps)
    event = PoissonGaussianEvent(stage=STAGE, noise_multiplier=sigma, sample_rate=plan.sample_rate, steps=plan.steps)
    after = compose_epsilon([*spent, event], run.delta)
    eps_after = after.upper
    if eps_after > eps:  # calibration guarantees otherwise; checked before anything is written
        raise AssertionError(f"ledger epsilon {eps_after} would exceed target {eps}")

    _, c, r, _ = sensitive.images.shape
    torch.manual_seed(seed)
    generator = method_obj.build_generator(r, c, sensitive.num_classes)
    inputs = []
    if method_obj.uses_pretraining:
        run.require_stage(PRETRAIN_STAGE, STAGE)
        generator.load_state_dict(torch_load_bytes(run.read_artifact(PRETRAINED))["state_dict"])
        inputs.append(PRETRAINED)
    check_dp_compatible(generator)

    config = {"eps": eps, "delta": run.delta, "epochs": epochs, "batch_size": batch_size, "clip": clip, "lr": lr,
              "grad_sample_mode": grad_sample_mode, "secure": secure, "noise_multiplier": sigma,
              "sample_rate": plan.sample_rate, "steps": plan.steps, "generator": generator.cfg.to_dict()}
    with run.lock():
        run.begin_stage(STAGE, config, inputs=inputs)
        run.manifest["privacy"]["target_epsilon"] = float(eps)
        run.record_event(event, after)  # write-ahead: before any noisy step
        # Batch sampling and noise must be secret: reseed from OS entropy, not the recorded seed.
        torch.manual_seed(secrets.randbits(63))
        try:
            trained = train_dp(generator, sensitive.images, sensitive.labels, method_obj.per_sample_loss, plan=plan,
                               noise_multiplier=sigma, clip=clip, lr=lr, grad_sample_mode=grad_sample_mode,
                               secure=secure,
                               progress=lambda d, t, _l: progress("finetune (DP-SGD)", d, t))
        except BaseException:
            run.end_stage(STAGE, status="failed")
            raise
        run.write_artifact(STAGE, GENERATOR, torch_bytes({"state_dict": trained.state_dict(),
                                                          "config": trained.cfg.to_dict()}))
        run.end_stage(STAGE)
    return {"epsilon_spent": eps_after, "target_epsilon": eps, "delta": run.delta, "noise_multiplier": sigma,
            "sample_rate": plan.sample_rate, "steps": plan.steps}
