"""`dpsynth finetune`: the method's private training on the sensitive set within the run's total --eps."""

from typing import Optional

import typer

from .flags import INVOKED, torchrun_follower
from .common import (ArchOpt, DeltaOpt, DeviceOpt, JsonOpt, MethodOpt, QuietOpt, RunOpt, creates_runs, emit,
                     progress_bars)

_DEFAULT = " Default: the method's."
_SMALL_N = " DP-SGD methods on fewer than 60,000 images: the default is adapted to N (see option_notes)."


@creates_runs()
def command(
    eps: float = typer.Option(..., "--eps", help="Target epsilon for the WHOLE run (all stages)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Passes over the sensitive set." + _DEFAULT + _SMALL_N),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Expected (Poisson) logical batch size."
                                             + _DEFAULT + _SMALL_N),
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
    precision: Optional[str] = typer.Option(None, "--precision", help="DP-SGD methods: fp32, or bf16 (the forward "
                                            "under bf16 autocast; per-example clipping and noise stay fp32)."
                                            " Default: fp32."),
    train_opts: Optional[str] = typer.Option(None, "--train-opts", help="Method-specific settings as JSON or k=v "
                                             "pairs (e.g. n_critic=5,lr_g=2e-4); unknown keys are refused."),
    secure: bool = typer.Option(False, "--secure", help="opacus secure_mode (CSPRNG noise; slower)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted or killed finetune from its last "
                                "checkpoint, under the privacy event it already recorded (same --eps)."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="Write a checkpoint every N "
                                                   "private steps (Ctrl-C always writes one; iterative methods)."),
    nproc: Optional[int] = typer.Option(None, "--nproc", help="Train in N local processes (DP-SGD methods): "
                                        "relaunches this command under torch.distributed, one shard of each "
                                        "Poisson batch per process; the mechanism and its epsilon are the "
                                        "one-process ones. Leave it out under torchrun."),
    arch: Optional[str] = ArchOpt, device: str = DeviceOpt,
    run: str = RunOpt, method: Optional[str] = MethodOpt, delta: Optional[float] = DeltaOpt,
    quiet: bool = QuietOpt, json_out: bool = JsonOpt, settings=None,
) -> None:
    """Private fine-tuning (DP-SGD or the method's own mechanism); noise is solved so ledger + these steps
    stay <= --eps."""
    from ..pipeline.finetune import run_finetune
    from ..training import distributed
    from ..training.options import FinetuneOptions

    if nproc is not None:
        processes = _check_nproc(nproc, method, run)
        if processes > 1:
            raise SystemExit(distributed.launch_workers(processes, _without_nproc(INVOKED)))
    follower = torchrun_follower()
    with progress_bars(quiet or json_out or follower, "finetune") as progress:
        options = FinetuneOptions(epochs=epochs, batch_size=batch_size, clip=clip, lr=lr,
                                  grad_sample_mode=grad_sample_mode, noise_multiplicity=noise_multiplicity,
                                  physical_batch_size=physical_batch_size, ema=ema,
                                  private_optimizer=private_optimizer, feedback_clip=feedback_clip,
                                  precision=precision, train_opts=train_opts, secure=secure)
        with distributed.leaving_group_after():
            result = run_finetune(run, settings, eps=eps, options=options, delta=delta, method=method, arch=arch,
                                  device=device, resume=resume, checkpoint_every=checkpoint_every,
                                  progress=progress)
    if not follower:  # rank 0 reports for all ranks
        emit(result, json_out, f"finetune → {run}")


def _check_nproc(nproc: int, method: Optional[str], run: str) -> int:
    """--nproc N: N >= 1, not under torchrun, and N > 1 only for a DP-SGD method (this run's)."""
    from ..errors import BadInput
    from ..methods import get_method
    from ..pipeline.finetune import DEFAULT_METHOD
    from ..pipeline.rundir import RunDir
    from ..training import distributed

    if distributed.launched_world_size() > 1:
        raise BadInput(f"nproc={nproc}: this process is already one of {distributed.launched_world_size()} "
                       f"launched by torchrun; drop `nproc`")
    name = method or (RunDir.open(run).manifest["method"] if RunDir.exists(run) else DEFAULT_METHOD)
    distributed.check_method(get_method(name), nproc)
    return nproc


def _without_nproc(argv: list[str]) -> list[str]:
    """The command line as given, less its --nproc: what each worker runs."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out
