"""`dpsynth evaluate`: accuracy under a named protocol and FID/KID on a named feature network."""

from typing import Optional

import typer

from ..stages.evaluate import run_evaluate
from .common import JsonOpt, QuietOpt, RunOpt, emit, progress_bars


def command(
    protocol: str = typer.Option("dp-safe-selection", "--protocol",
                                 help="dp-safe-selection (default) or test-set-selection (not DP; for comparison)."),
    classifier: str = typer.Option("cnn", "--classifier"), epochs: int = typer.Option(10, "--epochs"),
    feature_public: Optional[str] = typer.Option(None, "--feature-public",
                                                 help="Public set for the FID feature network (default: the run's)."),
    compare_protocols: bool = typer.Option(False, "--compare-protocols",
                                           help="Also select on the real test set (NOT DP) and print the overstatement."),
    run: str = RunOpt, quiet: bool = QuietOpt, json_out: bool = JsonOpt,
) -> None:
    """Train a classifier on the synthetic set, select by synthetic validation, report real-test accuracy."""
    with progress_bars(quiet or json_out) as progress:
        result = run_evaluate(run, protocol=protocol, classifier=classifier, epochs=epochs,
                              feature_public=feature_public, compare_protocols=compare_protocols,
                              progress=progress)
    emit(result, json_out, f"evaluate → {run}")
