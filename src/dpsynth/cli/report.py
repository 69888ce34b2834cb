"""`dpsynth report`: one table across runs (NOT DP rows marked) and PNG plots."""

import json
import sys
from pathlib import Path
from typing import List

import typer

from .common import JsonOpt, err

# reporting.DEFAULT_OUT and reporting.FORMATS, spelled here so `--help` does not load pandas (a test
# keeps the two equal).
DEFAULT_OUT = "reports"
FORMATS = ("markdown", "csv")


def command(
    runs: List[str] = typer.Argument(..., help="Run directories (each with a manifest.yaml); other directories "
                                     "(e.g. a glob's make stamps) are skipped with a warning.", show_default=False),
    out_dir: Path = typer.Option(Path(DEFAULT_OUT), "--out", help="Directory for the PNG plots."),
    fmt: str = typer.Option("markdown", "--format", help=f"Table format on stdout: {' or '.join(FORMATS)}."),
    json_out: bool = JsonOpt,
) -> None:
    """Tabulate every run's results (ε from its ledger) and plot privacy vs utility, class counts and samples."""
    from ..reporting import NOT_ACCOUNTED, check_format, format_table, table_records, write_report

    check_format(fmt)  # before reading anything, so a typo costs nothing
    report = write_report(runs_only(runs), out_dir)
    if json_out:
        payload = {"rows": table_records(report.table), "plots": [str(p) for p in report.plots],
                   "not_accounted": NOT_ACCOUNTED}
        sys.stdout.write(json.dumps(payload, default=str) + "\n")
        return
    sys.stdout.write(format_table(report.table, fmt))
    if fmt == "markdown":
        sys.stdout.write("\n" + NOT_ACCOUNTED + "\n")
        for path in report.plots:
            err.print(f"wrote {path}", highlight=False)
    else:  # on stderr, so the CSV on stdout stays parseable
        err.print(NOT_ACCOUNTED, highlight=False, soft_wrap=True)


def runs_only(paths: List[str]) -> List[str]:
    """`paths` less the directories that hold no manifest (`runs/*` also matches other folders): each is
    skipped with one warning line on stderr. A path that is not a directory, or a run whose manifest
    is unreadable, is left for the report to refuse; none left at all is refused here."""
    from ..errors import BadInput
    from ..pipeline.rundir import MANIFEST

    kept, skipped = [], []
    for path in paths:
        if Path(path).is_dir() and not (Path(path) / MANIFEST).exists():
            skipped.append(path)
        else:
            kept.append(path)
    for path in skipped:
        err.print(f"warning: skipping {path}: not a run directory (no {MANIFEST})", highlight=False, soft_wrap=True,
                  markup=False)
    if paths and not kept:
        given = f"{paths[0]} is not a run directory" if len(paths) == 1 else \
            f"none of the {len(paths)} directories given is a run directory"
        raise BadInput(f"{given} (no {MANIFEST}); pass the directories that 'dpsynth select-public', 'pretrain' "
                       f"or 'finetune' created, e.g. runs/<name>")
    return kept
