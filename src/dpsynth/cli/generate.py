"""`dpsynth generate`: labelled synthetic images (npz) and a PNG grid."""

import typer

from ..stages.generate import run_generate
from .common import JsonOpt, QuietOpt, RunOpt, emit, progress_bars


def command(n: int = typer.Option(10000, "--n", help="Number of images (class-balanced)."),
            seed: int = typer.Option(0, "--seed"), run: str = RunOpt, quiet: bool = QuietOpt,
            json_out: bool = JsonOpt) -> None:
    """Sample the fine-tuned generator (post-processing: no privacy cost)."""
    with progress_bars(quiet or json_out) as progress:
        result = run_generate(run, n=n, seed=seed, progress=progress)
    emit(result, json_out, f"generate → {run}")
