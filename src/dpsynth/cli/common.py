"""Shared CLI pieces: options, the progress bridge, output, and the error table."""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import sys
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..pipeline.names import DEFAULT_RUN
from ..progress import no_progress
from .method_names import method_names

out = Console()
err = Console(stderr=True)

RunOpt = typer.Option(os.environ.get("DPSYNTH_RUN", DEFAULT_RUN), "--run", "-r",
                      help="Run directory (default $DPSYNTH_RUN or runs/latest).")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress output (bars on a terminal, plain lines "
                                                       "otherwise); also $DPSYNTH_QUIET=1.")
JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON on stdout.")
SENSITIVE_HELP = ("Sensitive dataset: a name (fashionmnist, mnist, cifar10, celeba, ...), imagefolder:PATH or "
                  "npz:PATH (arrays 'images', or 'x': uint8, or float in 0..1, shaped N×H×W, N×H×W×C or N×C×H×W "
                  "with C 1 or 3; 'labels', or 'y': integers 0..K-1)")
SensitiveOpt = typer.Option(None, "--sensitive", help=SENSITIVE_HELP + " (new runs).")
PublicOpt = typer.Option(None, "--public", help="Public dataset name (labelled).")
MethodOpt = typer.Option(None, "--method", help="Method of a new run (default privimage-cvae; fixed once the run "
                         "exists): " + ", ".join(method_names()) + ". 'dpsynth methods' says what each does.")
DataRootOpt = typer.Option(None, "--data-root", help="Dataset root (default $DPSYNTH_DATA or ~/.cache/dpsynth/data).")
ResolutionOpt = typer.Option(None, "--resolution", help="Image size for the run (default: the sensitive set's).")
ChannelsOpt = typer.Option(None, "--channels", help="1 or 3 (default: the sensitive set's).")
LimitOpt = typer.Option(None, "--limit", help="Keep each sensitive image with probability LIMIT/N (keyed, 1-stable: "
                                              "about this many images; N as in --public-size). A default delta is then "
                                              "1/(N ln N) of the kept images.")
PublicSizeOpt = typer.Option(None, "--public-size", help="New runs: declared size N of the sensitive set, used "
                                                         "instead of the true size wherever N sets the sample rate, "
                                                         "steps, delta or a mean (the true size is then not released).")
SeedOpt = typer.Option(0, "--seed", help="Seed for model init and splits (never for DP noise).")
ArchOpt = typer.Option(None, "--arch", help="Generator architecture overrides: JSON or k=v pairs "
                                             "(e.g. width=16,ch_mult=2:2); fixed by the first stage that builds it.")
DeviceOpt = typer.Option("auto", "--device", help="auto (GPU if visible), cpu or cuda[:N].")
DeltaOpt = typer.Option(None, "--delta", help="Run's delta (default 1/(N ln N)); fixed once a run exists.")
HoldoutOpt = typer.Option(0.0, "--holdout", help="New runs: share of the sensitive train set kept from the generator "
                                                 "for 'evaluate --protocol noisy-val' (0 = none; at most 0.5).")
NoisyValEpsOpt = typer.Option(None, "--noisy-val-eps", help="New runs: epsilon reserved in the ledger now for the "
                                                            "noisy-val selection (needs --holdout).")
SensitiveTestOpt = typer.Option(None, "--sensitive-test", help="New runs: labelled test set for test accuracy "
                                "(npz:PATH, imagefolder:PATH or a name); npz:/imagefolder: runs need one, named "
                                "sets default to their official test split. Recorded in the run.")


@contextlib.contextmanager
def progress_bars(quiet: bool, stage: str = "dpsynth") -> Iterator:
    """Yields a callback with the library's one progress signature (`dpsynth.progress`): rich
    bars on a terminal, plain lines (`progress_lines`) on any other stderr; silent when quiet
    (or $DPSYNTH_QUIET=1)."""
    from .progress_lines import ProgressLines, interval_from_env, quiet_from_env

    if quiet or quiet_from_env():
        yield no_progress
        return
    if not err.is_terminal:
        def write(line: str) -> None:  # not through rich: it would wrap the line at 80 columns
            sys.stderr.write(line + "\n")
            sys.stderr.flush()

        with ProgressLines(stage, write, interval=interval_from_env()).running() as lines:
            yield lines
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=err, transient=False) as bars:
        tasks: dict[str, int] = {}

        def update(phase: str, done: int, total: int, loss: Optional[float] = None) -> None:
            if phase not in tasks:
                tasks[phase] = bars.add_task(phase, total=total)
            description = phase if loss is None else f"{phase} (loss {loss:.4g})"
            bars.update(tasks[phase], completed=done, total=total, description=description)

        yield update


def emit(result: dict, as_json: bool, title: str) -> None:
    if result.get("skipped") and not as_json:
        err.print(f"{title.split(' ')[0]}: skipped: {result['reason']}")
        return
    if as_json:
        sys.stdout.write(json.dumps(result, default=str) + "\n")
        return
    from .flags import HINTS, to_flags

    # A backticked parameter in a result's text ("pass `inception_weights`") reads as its flag.
    hints = HINTS
    table = Table(title=title, show_header=True)
    table.add_column("key", overflow="fold")
    table.add_column("value", overflow="fold", max_width=TEXT_WIDTH)  # long values wrap, never cut
    for key, value in result.items():
        table.add_row(str(key), to_flags(_fmt(value), {}, hints))
    print_table(table)


def print_table(table: Table) -> None:
    """On a terminal rich fits the table to its width; key columns are made `overflow="fold"`, so a
    narrow terminal wraps them instead of cutting them to `poisson_ga…`. Anywhere else (a pipe, a file,
    a log) the table takes its natural width, so no cell is cut: key columns stay on one line, and
    free-text columns (given a `max_width`, e.g. TEXT_WIDTH) wrap between words."""
    if out.is_terminal:
        out.print(table)
        return
    from rich.measure import Measurement

    natural = Measurement.get(out, out.options.update(max_width=_UNBOUNDED), table).maximum
    wide = Console(file=out.file, width=max(out.width, natural))
    wide.print(table)


_UNBOUNDED = 100_000
TEXT_WIDTH = 64  # widest a free-text column grows before it wraps


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return "; ".join(", ".join(f"{k}={v}" for k, v in item.items()) for item in value)
    return str(value)




# The flags a run's first stage fixes (select-public, pretrain and finetune can each create a run).
RUN_CREATION = {
    "sensitive": (Optional[str], SensitiveOpt), "public": (Optional[str], PublicOpt),
    "data_root": (Optional[str], DataRootOpt), "resolution": (Optional[int], ResolutionOpt),
    "channels": (Optional[int], ChannelsOpt), "limit": (Optional[int], LimitOpt), "seed": (int, SeedOpt),
    "holdout": (float, HoldoutOpt), "noisy_val_eps": (Optional[float], NoisyValEpsOpt),
    "public_size": (Optional[int], PublicSizeOpt), "sensitive_test": (Optional[str], SensitiveTestOpt),
}


def creates_runs(**overrides):
    """Decorator: adds the run-creation flags (RUN_CREATION, `overrides` replacing some of them as
    (annotation, Option)) to a command, and calls it with `settings` (DataSettings, or None when
    --sensitive is absent) instead of them."""
    def decorate(command):
        signature = inspect.signature(command)
        specs = {**RUN_CREATION, **overrides}
        added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)
                 for name, (annotation, option) in specs.items()]
        kept = [p for name, p in signature.parameters.items() if name != "settings"]

        @functools.wraps(command)
        def wrapper(**kwargs):
            settings = new_run_settings(**{name: kwargs.pop(name) for name in specs})
            return command(settings=settings, **kwargs)

        wrapper.__signature__ = signature.replace(parameters=[
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in kept] + added)
        return wrapper
    return decorate


def new_run_settings(sensitive, public, resolution, channels, limit, seed, data_root, holdout=0.0,
                     noisy_val_eps=None, public_size=None, sensitive_test=None):
    """Data settings for a run this command may create; None when --sensitive is absent
    (the command then works on an existing run and takes its recorded settings)."""
    from ..pipeline.common import DataSettings

    if not sensitive:
        if holdout or noisy_val_eps is not None or public_size is not None:
            from ..errors import BadInput
            raise BadInput("--holdout, --noisy-val-eps and --public-size are fixed when a run is created; pass "
                           "them with --sensitive on the run's first stage")
        if sensitive_test:
            from ..errors import BadInput
            raise BadInput("--sensitive-test is recorded when a run is created (with --sensitive); for an existing "
                           "run pass it to 'dpsynth evaluate --sensitive-test'")
        return None
    return DataSettings(sensitive=sensitive, public=public, resolution=resolution, channels=channels,
                        limit=limit, seed=seed, data_root=data_root, holdout=holdout, noisy_val_eps=noisy_val_eps,
                        public_size=public_size, sensitive_test=sensitive_test)
