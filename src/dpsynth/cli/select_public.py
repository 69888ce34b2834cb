"""`dpsynth select-public`: the semantic distribution query (PrivImage)."""

from typing import Optional

import typer

from .common import (SENSITIVE_HELP, DeltaOpt, DeviceOpt, JsonOpt, MethodOpt, QuietOpt, RunOpt, creates_runs, emit,
                     progress_bars)


@creates_runs(
    sensitive=(str, typer.Option(..., "--sensitive", help=SENSITIVE_HELP + ".")),
    public=(str, typer.Option("mnist5k", "--public", help="Labelled public dataset to select from.")))
def command(
    sigma: Optional[float] = typer.Option(None, "--sigma", help="Noise multiplier of the Gaussian query (std = sigma*sqrt(k))."),
    eps_query: Optional[float] = typer.Option(None, "--eps-query", help="Instead of --sigma: epsilon to spend on the query."),
    top_k: int = typer.Option(1, "--top-k", help="Public classes each sensitive image votes for."),
    select: Optional[int] = typer.Option(None, "--select", help="Public classes to select (default: one per sensitive class)."),
    device: str = DeviceOpt, run: str = RunOpt, method: Optional[str] = MethodOpt, delta: Optional[float] = DeltaOpt,
    quiet: bool = QuietOpt, json_out: bool = JsonOpt, settings=None,
) -> None:
    """Label the sensitive set with public classes, release a noisy histogram, select public data."""
    from ..pipeline.select_public import run_select_public

    with progress_bars(quiet or json_out, "select-public") as progress:
        result = run_select_public(run, settings, sigma=sigma, eps_query=eps_query, top_k=top_k, select=select,
                                   delta=delta, method=method, device=device, progress=progress)
    emit(result, json_out, f"select-public → {run}")
