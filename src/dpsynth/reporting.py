"""Cross-run reports: one table row per (run, protocol result), a privacy–utility plot, the
class balance of each synthetic set, and a verified copy of each run's sample grid.

Read-only on the runs: every artifact is checked against its manifest sha256 before use, and
everything is read and rendered before the first file is written, so a refused run leaves
the output directory untouched.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from .errors import BadInput, RunDirError
from .pipeline.rundir import MANIFEST, RunDir, atomic_write_bytes

from .pipeline.names import GRID, SYNTHETIC
from .validation import check_choice

# Fidelity columns say which features they come from: "_domain" (a named public-trained network)
# or "_inception" (clean-fid's Inception-v3); feature_network names the exact network either way.
FIDELITY = ("fid", "kid", "precision", "recall", "fld", "is")
DOMAIN_COLUMNS = tuple(f"{m}_domain" for m in FIDELITY)
INCEPTION_COLUMNS = tuple(f"{m}_inception" for m in FIDELITY)
COLUMNS = ("run", "run_id", "method", "sensitive", "epsilon", "delta", "accountant", "protocol", "dp_safe",
           "classifier", "accuracy", "accuracy_mean", "accuracy_best", "best_classifier", *DOMAIN_COLUMNS,
           *INCEPTION_COLUMNS, "image_reward", "feature_network", "n_synthetic", "test_set")
RESULT_KEYS = ("protocol", "dp_safe", "classifier", "accuracy", "accuracy_mean", "accuracy_best", "best_classifier",
               *DOMAIN_COLUMNS, *INCEPTION_COLUMNS, "image_reward", "feature_network", "n_synthetic", "test_set")
NOT_EVALUATED = "(not evaluated)"
PER_CLASSIFIER = "accuracy_"  # prefix of one column per classifier
NOT_DP_PROTOCOL = "test-set-selection"
FORMATS = ("markdown", "csv")
DEFAULT_OUT = "reports"
# Printed under the tables of `evaluate` and `report`: what these figures are, and what the ledger omits.
NOT_ACCOUNTED = ("Outside the ledger: these figures (test accuracy, FID/precision/recall against the training set) "
                 "are computed on sensitive data as reporting, not release; choosing the best of several runs by "
                 "them is not accounted.")
PRIVACY_UTILITY_PNG = "privacy_utility.png"
CLASS_COUNTS_PNG = "class_counts.png"

# Columns of the printed (markdown) table: `run` is the path (in csv/json), and dp_safe is folded
# into the protocol label so a non-DP row cannot be read without its mark. `accuracy` is the mean
# over the classifiers (as DPImageBench's tables combine them), `accuracy_best` the best one.
# Inception columns are shown only when some run has them.
_DISPLAY = ("run_id", "method", "sensitive", "epsilon", "delta", "protocol", "classifier", "accuracy",
            "accuracy_best", *DOMAIN_COLUMNS, *INCEPTION_COLUMNS, "n_synthetic", "feature_network")


@dataclass
class Report:
    table: pd.DataFrame
    plots: list[Path] = field(default_factory=list)


# ---- table ----------------------------------------------------------------------------------
def collect_results(run_paths: Sequence[str | Path]) -> pd.DataFrame:
    """One row per (run, protocol result) with COLUMNS; missing values are NaN. A run without
    results yet gives one row with protocol NOT_EVALUATED. Unreadable runs raise RunDirError."""
    rows: list[dict] = []
    for path, run in _open_runs(run_paths):
        rows.extend(_rows(path, run))
    # Each classifier's own accuracy, after the fixed columns (accuracy_<name>, as in results.csv).
    extra = sorted({key for row in rows for key in row if key not in COLUMNS})
    return pd.DataFrame(rows, columns=[*COLUMNS, *extra])


def _open_runs(run_paths: Sequence[str | Path]) -> list[tuple[Path, RunDir]]:
    if isinstance(run_paths, (str, Path)):
        run_paths = [run_paths]
    if not run_paths:
        raise BadInput("no run directories given; pass one or more run directories")
    seen: dict[Path, Path] = {}
    runs = []
    for raw in run_paths:
        path = Path(raw)
        key = path.resolve()
        if key in seen:
            # The same run twice would be two markers for one release.
            also = "" if str(seen[key]) == str(path) else f" (also as {seen[key]})"
            raise BadInput(f"run directory {path} is given twice{also}; give each run once")
        seen[key] = path
        runs.append((path, RunDir.open(path)))
    return runs


def _missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # lists and other containers
        return False


def _value(value: Any) -> Any:
    return math.nan if _missing(value) else value


def _rows(path: Path, run: RunDir) -> list[dict]:
    manifest = run.manifest
    privacy = manifest["privacy"]
    base = {
        "run": str(path),
        "run_id": _value(manifest.get("run_id")),
        "method": _value(manifest.get("method")),
        "sensitive": _value(manifest["sensitive"].get("name")),
        # The ledger's epsilon, not the one copied into a result: later events count too.
        "epsilon": _float(privacy.get("epsilon")),
        "delta": _float(privacy.get("delta")),
        "accountant": _value(privacy.get("accountant")),
    }
    results = manifest.get("results") or {}
    if not isinstance(results, dict):
        raise RunDirError(f"manifest {run.path / MANIFEST} is invalid: 'results' is not a mapping")
    if not results:
        return [{**base, **{key: math.nan for key in RESULT_KEYS}, "protocol": NOT_EVALUATED}]
    rows = []
    for name, result in results.items():
        if not isinstance(result, dict):
            raise RunDirError(f"manifest {run.path / MANIFEST} is invalid: results[{name!r}] is not a mapping")
        row = {**base, **{key: _value(result.get(key)) for key in RESULT_KEYS}}
        if "accuracy_best" not in result and "accuracy_mean" in result:
            # Written before the headline became the mean: there `accuracy` was the best classifier's.
            row["accuracy_best"], row["accuracy"] = row["accuracy"], row["accuracy_mean"]
        per_classifier = result.get("per_classifier")
        if isinstance(per_classifier, dict):
            row.update({f"{PER_CLASSIFIER}{name}": _value((values or {}).get("accuracy"))
                        for name, values in per_classifier.items() if isinstance(values, dict)})
        if _missing(row["protocol"]):
            row["protocol"] = str(name)
        rows.append(row)
    return rows


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def protocol_label(protocol: Any, dp_safe: Any) -> str:
    """The protocol as printed: a result not selected DP-safely is marked NOT DP."""
    protocol = str(protocol)
    if protocol == NOT_EVALUATED:
        return protocol
    if dp_safe is False or (isinstance(dp_safe, np.bool_) and not dp_safe) or protocol == NOT_DP_PROTOCOL:
        return f"{protocol} (NOT DP)"
    if dp_safe is True or isinstance(dp_safe, np.bool_):
        return protocol
    return f"{protocol} (DP-safety unknown)"


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        check_choice("fmt", fmt, FORMATS)


def format_table(table: pd.DataFrame, fmt: str = "markdown") -> str:
    """`markdown`: a pipe table with NOT DP marks; `csv`: every column, raw values."""
    check_format(fmt)
    if fmt == "csv":
        return table.to_csv(index=False)
    header = [c for c in _DISPLAY if c not in INCEPTION_COLUMNS or table[c].notna().any()]
    # Per-classifier accuracies only when some row averages over more than one classifier.
    if table["classifier"].astype(str).str.contains(",").any():
        at = header.index("accuracy_best") + 1
        header[at:at] = [c for c in table.columns if c.startswith(PER_CLASSIFIER) and c not in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for _, row in table.iterrows():
        cells = []
        for column in header:
            value = protocol_label(row["protocol"], row["dp_safe"]) if column == "protocol" else row[column]
            cells.append(_cell(column, value).replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(column: str, value: Any) -> str:
    if _missing(value):
        return "n/a"
    if column == "n_synthetic":
        return str(int(value)) if isinstance(value, (int, float, np.number)) else str(value)
    if column == "delta":
        return f"{float(value):.3g}"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4g}"
    return str(value)


def table_records(table: pd.DataFrame) -> list[dict]:
    """Rows as JSON-ready dicts: NaN -> None, numpy scalars -> Python."""
    records = []
    for row in table.to_dict("records"):
        records.append({key: (None if _missing(v) else v.item() if isinstance(v, np.generic) else v)
                        for key, v in row.items()})
    return records


# ---- figures --------------------------------------------------------------------------------
def fid_axis_label(feature_networks: Iterable[Any]) -> str:
    """Never just "FID": the domain FID is only meaningful with the network that produced it."""
    names = sorted({str(name) for name in feature_networks if not _missing(name)})
    if len(names) == 1:
        return f"FID on {names[0]}"
    if not names:
        return "FID (domain features; no run evaluated)"
    return "FID (domain features; see table)"


def _run_labels(table: pd.DataFrame) -> dict[str, str]:
    """Legend label per run path: its run_id, or the path where run_ids collide or are absent."""
    first = table.drop_duplicates("run")
    ids = first["run_id"].tolist()
    return {run: (str(rid) if not _missing(rid) and ids.count(rid) == 1 else run)
            for run, rid in zip(first["run"], ids)}


def privacy_utility_figure(table: pd.DataFrame):
    """Accuracy vs epsilon and domain FID vs epsilon, one colour per run; non-DP rows as x."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(11, 4.5), layout="constrained")
    ax_acc, ax_fid = fig.subplots(1, 2)
    # Inception FID when any run has it (then only those runs' networks label the axis), else domain FID.
    fid_column = "fid_inception" if table["fid_inception"].notna().any() else "fid_domain"
    labels = _run_labels(table)
    colours = _colours(len(labels))
    handles = []
    any_not_dp = False
    for colour, (run, label) in zip(colours, labels.items()):
        rows = table[table["run"] == run]
        if (rows["protocol"] == NOT_EVALUATED).all():
            label += " (not evaluated)"
        handles.append(Line2D([], [], color=colour, marker="o", linestyle="", label=label))
        for _, row in rows.iterrows():
            if row["protocol"] == NOT_EVALUATED:
                continue
            not_dp = protocol_label(row["protocol"], row["dp_safe"]).endswith("(NOT DP)")
            any_not_dp |= not_dp
            style = dict(color=colour, marker="x" if not_dp else "o", s=60)
            if not _missing(row["accuracy"]):
                ax_acc.scatter([row["epsilon"]], [row["accuracy"]], **style)
            if not _missing(row[fid_column]):
                ax_fid.scatter([row["epsilon"]], [row[fid_column]], **style)
    for protocol in _curves(table, ax_acc, ax_fid, fid_column):
        handles.append(Line2D([], [], color="grey", linestyle=_CURVE_STYLE[protocol], label=f"{protocol} across runs"))
    if any_not_dp:
        handles.append(Line2D([], [], color="black", marker="x", linestyle="", label="NOT DP (test-set selection)"))
    epsilon_label = "ε (privacy ledger, at each run's δ)"
    ax_acc.set_xlabel(epsilon_label)
    ax_acc.set_ylabel("accuracy on the real test set")
    ax_acc.set_title("utility")
    ax_fid.set_xlabel(epsilon_label)
    networks = table.loc[table[fid_column].notna(), "feature_network"]
    ax_fid.set_ylabel(fid_axis_label(networks if len(networks) else table["feature_network"]), fontsize=8)
    ax_fid.set_title("fidelity (lower is better)")
    for ax in (ax_acc, ax_fid):
        ax.grid(alpha=0.3)
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 3), fontsize=8)
    return fig


_CURVE_STYLE = {"dp-safe-selection": "-", "noisy-val": "--"}


def _curves(table: pd.DataFrame, ax_acc, ax_fid, fid_column: str) -> list[str]:
    """The privacy-utility curves: per (method, sensitive set, DP-safe protocol), a line through the
    runs' points in order of epsilon, where at least two runs share them. Returns the protocols drawn."""
    drawn: list[str] = []
    rows = table[table["protocol"].isin(list(_CURVE_STYLE))]
    for (method, sensitive, protocol), group in rows.groupby(["method", "sensitive", "protocol"], dropna=False):
        group = group.sort_values("epsilon")
        if group["run"].nunique() < 2:
            continue
        style = dict(color="grey", linewidth=1, linestyle=_CURVE_STYLE[protocol],
                     label=f"{method} / {sensitive} / {protocol}", zorder=0)
        ax_acc.plot(group["epsilon"], group["accuracy"], **style)
        ax_fid.plot(group["epsilon"], group[fid_column], **style)
        if protocol not in drawn:
            drawn.append(protocol)
    return drawn


def class_counts_figure(counts: dict[str, np.ndarray]):
    """Grouped bars: for each class, the number of synthetic images of that class per run."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 0.6 * max((len(c) for c in counts.values()), default=1) + 3), 4),
                 layout="constrained")
    ax = fig.subplots()
    n_classes = max((len(c) for c in counts.values()), default=0)
    width = 0.8 / max(len(counts), 1)
    for i, (colour, (label, per_class)) in enumerate(zip(_colours(len(counts)), counts.items())):
        x = np.arange(len(per_class)) - 0.4 + width * (i + 0.5)
        ax.bar(x, per_class, width=width, color=colour, label=label)
    ax.set_xticks(np.arange(n_classes))
    ax.set_xlabel("class label")
    ax.set_ylabel("synthetic images")
    ax.set_title("class counts of the synthetic sets")
    if counts:
        fig.legend(loc="outside right upper", fontsize=8)  # outside: never hides a bar
    return fig


def _colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _png_bytes(fig) -> bytes:
    buffer = io.BytesIO()
    # Figure.savefig renders with the Agg canvas directly: no pyplot, never a display.
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


# ---- the whole report -----------------------------------------------------------------------
def class_counts(run: RunDir) -> np.ndarray | None:
    """Per-class label counts of the run's verified synthetic set; None if it has none."""
    if not run.has_artifact(SYNTHETIC):
        return None
    data = run.read_artifact(SYNTHETIC)
    try:
        with np.load(io.BytesIO(data)) as npz:
            labels = np.asarray(npz["labels"])
    except KeyError:
        raise RunDirError(f"artifact {run.path / SYNTHETIC} has no 'labels' array") from None
    except (ValueError, OSError) as exc:
        raise RunDirError(f"artifact {run.path / SYNTHETIC} is not a readable npz ({exc})") from None
    if labels.size and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0):
        raise RunDirError(f"artifact {run.path / SYNTHETIC} has labels that are not non-negative integers")
    num_classes = int(run.manifest["sensitive"].get("num_classes") or 0)
    return np.bincount(labels.ravel().astype(np.int64), minlength=num_classes)


def _sample_name(run: RunDir, taken: set[str]) -> str:
    run_id = str(run.manifest.get("run_id") or run.path.name)
    stem = "samples_" + (re.sub(r"[^A-Za-z0-9._-]", "_", run_id).strip(".") or "run")
    name, n = f"{stem}.png", 2
    while name in taken:  # copies of one run directory share a run_id
        name, n = f"{stem}-{n}.png", n + 1
    taken.add(name)
    return name


def write_report(run_paths: Sequence[str | Path], out_dir: str | Path = DEFAULT_OUT) -> Report:
    """Collect the table and write privacy_utility.png, class_counts.png (when any run has a
    synthetic set) and samples_<run_id>.png per run with a grid. Returns the table and the
    paths written. An unreadable run or a changed artifact raises before anything is written."""
    runs = _open_runs(run_paths)
    table = collect_results([path for path, _ in runs])

    files: dict[str, bytes] = {}
    counts: dict[str, np.ndarray] = {}
    labels = _run_labels(table)
    taken: set[str] = set()
    for path, run in runs:
        per_class = class_counts(run)
        if per_class is not None:
            counts[labels[str(path)]] = per_class
        if run.has_artifact(GRID):
            files[_sample_name(run, taken)] = run.read_artifact(GRID)

    rendered = {PRIVACY_UTILITY_PNG: _png_bytes(privacy_utility_figure(table))}
    if counts:
        rendered[CLASS_COUNTS_PNG] = _png_bytes(class_counts_figure(counts))
    files = {**rendered, **files}

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise BadInput(f"out_dir={out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in files.items():
        atomic_write_bytes(out / name, data)
        written.append(out / name)
    return Report(table=table, plots=written)
