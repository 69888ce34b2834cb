"""`dpsynth finetune`: DP-SGD on the sensitive set within the run's total --eps."""

from typing import Optional

import typer

from ..stages.finetune import run_finetune
from .common import (ChannelsOpt, DataRootOpt, DeltaOpt, HoldoutOpt, NoisyValEpsOpt, JsonOpt, LimitOpt, MethodOpt, PublicOpt, QuietOpt,
                     ResolutionOpt, RunOpt, SeedOpt, SensitiveOpt, emit, new_run_settings, progress_bars)


def command(
    eps: float = typer.Option(..., "--eps", help="Target epsilon for the WHOLE run (all stages)."),
    epochs: int = typer.Option(2, "--epochs"), batch_size: int = typer.Option(512, "--batch-size",
                                                                            help="Expected (Poisson) batch size."),
    clip: float = typer.Option(1.0, "--clip", help="Per-sample gradient clipping norm."),
    lr: float = typer.Option(1e-3, "--lr"),
    grad_sample_mode: str = typer.Option("ghost", "--grad-sample-mode", help="opacus mode: ghost, hooks, functorch."),
    secure: bool = typer.Option(False, "--secure", help="opacus secure_mode (CSPRNG noise; slower)."),
    run: str = RunOpt, sensitive: Optional[str] = SensitiveOpt, public: Optional[str] = PublicOpt,
    method: Optional[str] = MethodOpt, data_root: Optional[str] = DataRootOpt,
    resolution: Optional[int] = ResolutionOpt, channels: Optional[int] = ChannelsOpt, limit: Optional[int] = LimitOpt,
    seed: int = SeedOpt, delta: Optional[float] = DeltaOpt, holdout: float = HoldoutOpt,
    noisy_val_eps: Optional[float] = NoisyValEpsOpt, quiet: bool = QuietOpt, json_out: bool = JsonOpt,
) -> None:
    """DP-SGD fine-tuning; noise is solved so ledger + these steps stay <= --eps."""
    settings = new_run_settings(sensitive, public, resolution, channels, limit, seed, data_root, holdout,
                                noisy_val_eps)
    with progress_bars(quiet or json_out) as progress:
        result = run_finetune(run, settings, eps=eps, delta=delta, epochs=epochs, batch_size=batch_size, clip=clip,
                              lr=lr, grad_sample_mode=grad_sample_mode, secure=secure, method=method,
                              progress=progress)
    emit(result, json_out, f"finetune → {run}")
