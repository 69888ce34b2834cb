"""`dpsynth pretrain`: train the generator on (selected) public data; no privacy cost."""

from typing import Optional

import typer

from ..stages.pretrain import run_pretrain
from .common import (ChannelsOpt, DataRootOpt, DeltaOpt, HoldoutOpt, NoisyValEpsOpt, JsonOpt, LimitOpt, MethodOpt, PublicOpt, QuietOpt,
                     ResolutionOpt, RunOpt, SeedOpt, SensitiveOpt, emit, new_run_settings, progress_bars)


def command(
    epochs: int = typer.Option(10, "--epochs"), batch_size: int = typer.Option(128, "--batch-size"),
    lr: float = typer.Option(2e-3, "--lr"),
    run: str = RunOpt, sensitive: Optional[str] = SensitiveOpt, public: Optional[str] = PublicOpt,
    method: Optional[str] = MethodOpt, data_root: Optional[str] = DataRootOpt,
    resolution: Optional[int] = ResolutionOpt, channels: Optional[int] = ChannelsOpt, limit: Optional[int] = LimitOpt,
    seed: int = SeedOpt, delta: Optional[float] = DeltaOpt, holdout: float = HoldoutOpt,
    noisy_val_eps: Optional[float] = NoisyValEpsOpt, quiet: bool = QuietOpt, json_out: bool = JsonOpt,
) -> None:
    """Pretrain the generator on the public subset chosen by select-public (or the whole public set)."""
    settings = new_run_settings(sensitive, public, resolution, channels, limit, seed, data_root, holdout,
                                noisy_val_eps)
    with progress_bars(quiet or json_out) as progress:
        result = run_pretrain(run, settings, epochs=epochs, batch_size=batch_size, lr=lr, method=method,
                              delta=delta, progress=progress)
    emit(result, json_out, f"pretrain → {run}")
