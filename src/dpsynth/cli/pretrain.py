"""`dpsynth pretrain`: the generator's start: public data, or DP-FETA's DP central images."""

from typing import Optional

import typer

from ..pipeline.pretrain import run_pretrain
from .common import (PublicSizeOpt, ArchOpt, ChannelsOpt, DataRootOpt, DeltaOpt, DeviceOpt, HoldoutOpt, JsonOpt, LimitOpt, MethodOpt,
                     NoisyValEpsOpt, PublicOpt, QuietOpt, ResolutionOpt, RunOpt, SeedOpt, SensitiveOpt, emit,
                     new_run_settings, progress_bars, SensitiveTestOpt)


def command(
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Default: the method's."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Default: the method's."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Default: the method's."),
    central_sigma: float = typer.Option(5.0, "--central-sigma", help="DP-FETA: noise multiplier of each central-image "
                                                                     "query."),
    central_queries: int = typer.Option(5, "--central-queries", help="DP-FETA: number of queries (images per class)."),
    central_batch: int = typer.Option(6000, "--central-batch", help="DP-FETA: expected Poisson batch per query."),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="DP-FETA: RandAugment during the warm-up."),
    arch: Optional[str] = ArchOpt, device: str = DeviceOpt,
    run: str = RunOpt, sensitive: Optional[str] = SensitiveOpt, public: Optional[str] = PublicOpt,
    method: Optional[str] = MethodOpt, data_root: Optional[str] = DataRootOpt,
    resolution: Optional[int] = ResolutionOpt, channels: Optional[int] = ChannelsOpt, limit: Optional[int] = LimitOpt,
    seed: int = SeedOpt, delta: Optional[float] = DeltaOpt, holdout: float = HoldoutOpt,
    noisy_val_eps: Optional[float] = NoisyValEpsOpt, public_size: Optional[int] = PublicSizeOpt,
    sensitive_test: Optional[str] = SensitiveTestOpt,
    quiet: bool = QuietOpt, json_out: bool = JsonOpt,
) -> None:
    """Pretrain on the public subset chosen by select-public (or the whole public set), or warm up on DP-FETA's
    central images (a privacy event)."""
    settings = new_run_settings(sensitive, public, resolution, channels, limit, seed, data_root, holdout,
                                noisy_val_eps, public_size, sensitive_test)
    with progress_bars(quiet or json_out) as progress:
        result = run_pretrain(run, settings, epochs=epochs, batch_size=batch_size, lr=lr, method=method,
                              delta=delta, arch=arch, device=device, central_sigma=central_sigma,
                              central_queries=central_queries, central_batch=central_batch, augment=augment,
                              progress=progress)
    emit(result, json_out, f"pretrain → {run}")
