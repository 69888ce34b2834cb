"""`dpsynth pretrain`: the generator's start: public data, or DP-FETA's DP central images."""

from typing import Optional

import typer

from ..pipeline.pretrain import run_pretrain
from .common import (ArchOpt, DeltaOpt, DeviceOpt, JsonOpt, MethodOpt, QuietOpt, RunOpt, creates_runs, emit,
                     progress_bars)


@creates_runs()
def command(
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Default: the method's."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Default: the method's."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Default: the method's."),
    central_sigma: float = typer.Option(5.0, "--central-sigma", help="DP-FETA: noise multiplier of each central-image "
                                                                     "query."),
    central_queries: int = typer.Option(5, "--central-queries", help="DP-FETA: number of queries (images per class)."),
    central_batch: int = typer.Option(6000, "--central-batch", help="DP-FETA: expected Poisson batch per query."),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="DP-FETA: RandAugment during the warm-up."),
    train_opts: Optional[str] = typer.Option(None, "--train-opts", help="Method-specific pretraining settings as "
                                             "JSON or k=v pairs (e.g. DP-LDM's ae_epochs=4); see `dpsynth methods`."),
    arch: Optional[str] = ArchOpt, device: str = DeviceOpt,
    run: str = RunOpt, method: Optional[str] = MethodOpt, delta: Optional[float] = DeltaOpt,
    quiet: bool = QuietOpt, json_out: bool = JsonOpt, settings=None,
) -> None:
    """Pretrain on the public subset chosen by select-public (or the whole public set), or warm up on DP-FETA's
    central images (a privacy event)."""
    with progress_bars(quiet or json_out) as progress:
        result = run_pretrain(run, settings, epochs=epochs, batch_size=batch_size, lr=lr, method=method,
                              delta=delta, arch=arch, device=device, central_sigma=central_sigma,
                              central_queries=central_queries, central_batch=central_batch, augment=augment,
                              train_opts=train_opts, progress=progress)
    emit(result, json_out, f"pretrain → {run}")
