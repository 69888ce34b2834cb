"""`dpsynth finetune`: the method's private training on the sensitive set within the run's total --eps."""

from typing import Optional

import typer

from .common import (ArchOpt, DeltaOpt, DeviceOpt, JsonOpt, MethodOpt, QuietOpt, RunOpt, creates_runs, emit,
                     progress_bars)

_DEFAULT = " Default: the method's."


@creates_runs()
def command(
    eps: float = typer.Option(..., "--eps", help="Target epsilon for the WHOLE run (all stages)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Passes over the sensitive set." + _DEFAULT),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Expected (Poisson) logical batch size."
                                             + _DEFAULT),
    clip: Optional[float] = typer.Option(None, "--clip", help="Per-example gradient clipping norm." + _DEFAULT),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate." + _DEFAULT),
    grad_sample_mode: Optional[str] = typer.Option(None, "--grad-sample-mode",
                                                   help="Per-example gradients: vmap, ghost, hooks, functorch."
                                                        + _DEFAULT),
    noise_multiplicity: Optional[int] = typer.Option(None, "--noise-multiplicity", "-K",
                                                     help="Diffusion noise draws averaged per example before "
                                                          "clipping (DPDM)." + _DEFAULT),
    physical_batch_size: Optional[int] = typer.Option(None, "--physical-batch-size",
                                                      help="Examples per forward/backward; logical batches are "
                                                           "split (virtual steps)." + _DEFAULT),
    ema: Optional[float] = typer.Option(None, "--ema", help="EMA rate of the weights (e.g. 0.999)." + _DEFAULT),
    private_optimizer: Optional[str] = typer.Option(None, "--optimizer", help="Private optimizer: dpsgd (opacus) or efsgd "
                                            "(error feedback, EFSGD/DiceSGD)." + _DEFAULT),
    feedback_clip: Optional[float] = typer.Option(None, "--feedback-clip", help="EFSGD: clipping norm C2 of the "
                                                  "error-feedback term." + _DEFAULT),
    train_opts: Optional[str] = typer.Option(None, "--train-opts", help="Method-specific settings as JSON or k=v "
                                             "pairs (e.g. n_critic=5,lr_g=2e-4); unknown keys are refused."),
    secure: bool = typer.Option(False, "--secure", help="opacus secure_mode (CSPRNG noise; slower)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted or killed finetune from its last "
                                "checkpoint, under the privacy event it already recorded (same --eps)."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="Write a checkpoint every N "
                                                   "private steps (Ctrl-C always writes one; iterative methods)."),
    arch: Optional[str] = ArchOpt, device: str = DeviceOpt,
    run: str = RunOpt, method: Optional[str] = MethodOpt, delta: Optional[float] = DeltaOpt,
    quiet: bool = QuietOpt, json_out: bool = JsonOpt, settings=None,
) -> None:
    """Private fine-tuning (DP-SGD or the method's own mechanism); noise is solved so ledger + these steps
    stay <= --eps."""
    from ..pipeline.finetune import run_finetune
    from ..training.options import FinetuneOptions

    with progress_bars(quiet or json_out, "finetune") as progress:
        options = FinetuneOptions(epochs=epochs, batch_size=batch_size, clip=clip, lr=lr,
                                  grad_sample_mode=grad_sample_mode, noise_multiplicity=noise_multiplicity,
                                  physical_batch_size=physical_batch_size, ema=ema,
                                  private_optimizer=private_optimizer, feedback_clip=feedback_clip,
                                  train_opts=train_opts, secure=secure)
        result = run_finetune(run, settings, eps=eps, options=options, delta=delta, method=method, arch=arch,
                              device=device, resume=resume, checkpoint_every=checkpoint_every, progress=progress)
    emit(result, json_out, f"finetune → {run}")
