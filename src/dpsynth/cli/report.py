"""`dpsynth report`: one table across runs (NOT DP rows marked) and PNG plots."""

import json
import sys
from pathlib import Path
from typing import List

import typer

from ..reporting import (DEFAULT_OUT, FORMATS, NOT_ACCOUNTED, check_format, format_table, table_records,
                         write_report)
from .common import JsonOpt, err


def command(
    runs: List[str] = typer.Argument(..., help="Run directories (each with a manifest.yaml).", show_default=False),
    out_dir: Path = typer.Option(Path(DEFAULT_OUT), "--out", help="Directory for the PNG plots."),
    fmt: str = typer.Option("markdown", "--format", help=f"Table format on stdout: {' or '.join(FORMATS)}."),
    json_out: bool = JsonOpt,
) -> None:
    """Tabulate every run's results (ε from its ledger) and plot privacy vs utility, class counts and samples."""
    check_format(fmt)  # before reading anything, so a typo costs nothing
    report = write_report(runs, out_dir)
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
