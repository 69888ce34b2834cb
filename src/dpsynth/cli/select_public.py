"""`dpsynth select-public`: the semantic distribution query (PrivImage)."""

from typing import Optional

import typer

from ..pipeline.select_public import run_select_public
from .common import (PublicSizeOpt, ChannelsOpt, DataRootOpt, DeltaOpt, HoldoutOpt, NoisyValEpsOpt, JsonOpt, LimitOpt, MethodOpt, QuietOpt, ResolutionOpt,
                     RunOpt, SeedOpt, emit, new_run_settings, progress_bars, SensitiveTestOpt)


def command(
    sensitive: str = typer.Option(..., "--sensitive", help="Sensitive dataset (name, imagefolder:PATH, npz:PATH)."),
    public: str = typer.Option("mnist5k", "--public", help="Labelled public dataset to select from."),
    sigma: Optional[float] = typer.Option(None, "--sigma", help="Noise multiplier of the Gaussian query (std = sigma*sqrt(k))."),
    eps_query: Optional[float] = typer.Option(None, "--eps-query", help="Instead of --sigma: epsilon to spend on the query."),
    top_k: int = typer.Option(1, "--top-k", help="Public classes each sensitive image votes for."),
    select: Optional[int] = typer.Option(None, "--select", help="Public classes to select (default: one per sensitive class)."),
    run: str = RunOpt, method: Optional[str] = MethodOpt, data_root: Optional[str] = DataRootOpt,
    resolution: Optional[int] = ResolutionOpt, channels: Optional[int] = ChannelsOpt, limit: Optional[int] = LimitOpt,
    seed: int = SeedOpt, delta: Optional[float] = DeltaOpt, holdout: float = HoldoutOpt,
    noisy_val_eps: Optional[float] = NoisyValEpsOpt, public_size: Optional[int] = PublicSizeOpt,
    sensitive_test: Optional[str] = SensitiveTestOpt,
    quiet: bool = QuietOpt, json_out: bool = JsonOpt,
) -> None:
    """Label the sensitive set with public classes, release a noisy histogram, select public data."""
    settings = new_run_settings(sensitive, public, resolution, channels, limit, seed, data_root, holdout,
                                noisy_val_eps, public_size, sensitive_test)
    with progress_bars(quiet or json_out) as progress:
        result = run_select_public(run, settings, sigma=sigma, eps_query=eps_query, top_k=top_k, select=select,
                                   delta=delta, method=method, progress=progress)
    emit(result, json_out, f"select-public → {run}")
