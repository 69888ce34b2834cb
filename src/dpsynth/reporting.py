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
# The public-nearer check (evaluate): FID of the synthetic set to the sensitive and to the public set.
NEARER_COLUMNS = ("public_nearer", "nearer_fid_sensitive", "nearer_fid_public", "nearer_check")
COLUMNS = ("run", "run_id", "method", "sensitive", "n_sensitive", "epsilon", "delta", "accountant", "protocol",
           "dp_safe", "classifier", "accuracy", "accuracy_mean", "accuracy_best", "best_classifier", "epochs",
           *DOMAIN_COLUMNS, *INCEPTION_COLUMNS, "image_reward", "feature_network", *NEARER_COLUMNS, "n_synthetic",
           "test_set")
RESULT_KEYS = ("protocol", "dp_safe", "classifier", "accuracy", "accuracy_mean", "accuracy_best", "best_classifier",
               "epochs", *DOMAIN_COLUMNS, *INCEPTION_COLUMNS, "image_reward", "feature_network", *NEARER_COLUMNS,
               "n_synthetic", "test_set")
NOT_EVALUATED = "(not evaluated)"
PER_CLASSIFIER = "accuracy_"  # prefix of one column per classifier
SELECTED_EPOCH = "selected_epoch_"  # prefix of one column per classifier: its selected epoch, 1-based
NOT_DP_PROTOCOL = "test-set-selection"
FORMATS = ("markdown", "csv")
DEFAULT_OUT = "reports"
# Printed under the tables of `evaluate` and `report`: what these figures are, and what the ledger omits.
NOT_ACCOUNTED = ("Outside the ledger: these figures (test accuracy, FID/precision/recall against the training set, "
                 "the public-nearer check) are computed on sensitive data as reporting, not release; choosing the best of several runs by "
                 "them is not accounted.")
PRIVACY_UTILITY_PNG = "privacy_utility.png"
CLASS_COUNTS_PNG = "class_counts.png"

# Columns of the printed (markdown) table: `run` is the directory as the user gave it (run_id stays in
# csv/json), and dp_safe is folded into the protocol label so a non-DP row cannot be read without its
# mark. `accuracy` is the mean over the classifiers (as DPImageBench's tables combine them),
# `accuracy_best` the best one. Inception columns are shown only when some run has them, the
# public-nearer flag only when some run raised it. Units are in the header: accuracies in percent,
# Inception KID x10^3 (domain KID raw: its scale follows the network's features, often above 1),
# epochs 1-based.
_DISPLAY = ("run", "method", "sensitive", "n_sensitive", "epsilon", "delta", "protocol", "classifier", "accuracy",
            "accuracy_best", "selected_epoch", *DOMAIN_COLUMNS, *INCEPTION_COLUMNS, "public_nearer",
            "n_synthetic", "feature_network")
_HEADER = {"n_sensitive": "N", "accuracy": "accuracy (%)", "accuracy_best": "accuracy_best (%)",
           "selected_epoch": "selected epoch (1 = first, of E)", "kid_domain": "kid_domain (raw)",
           "kid_inception": "kid_inception (x10^3)", "public_nearer": "nearer public than sensitive"}
KID_SCALE = 1000.0  # Inception KID is printed x10^3, as published KID tables are; csv/json keep raw values


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
    # Each classifier's own accuracy and selected epoch, after the fixed columns (as in results.csv).
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
        "n_sensitive": _value(manifest["sensitive"].get("size")),  # N as the manifest declares it
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
            per_classifier = {name: values for name, values in per_classifier.items() if isinstance(values, dict)}
            row.update({f"{PER_CLASSIFIER}{name}": _value(values.get("accuracy"))
                        for name, values in per_classifier.items()})
            row.update({f"{SELECTED_EPOCH}{name}": _value(values.get("selected_epoch"))
                        for name, values in per_classifier.items()})
            if _missing(row["epochs"]):  # results written before `epochs` was kept: one score per epoch
                lengths = {len(v.get("selection_scores") or []) for v in per_classifier.values()}
                row["epochs"] = lengths.pop() if len(lengths) == 1 and 0 not in lengths else math.nan
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
    """`markdown`: a pipe table with NOT DP marks and units in the header (accuracy in percent, Inception
    KID x10^3, domain KID raw, epochs 1-based); `csv`: every column, raw values (accuracy a fraction, KID unscaled, as in results.csv)."""
    check_format(fmt)
    if fmt == "csv":
        return table.to_csv(index=False)
    optional = (*INCEPTION_COLUMNS, "public_nearer")
    header = [c for c in _DISPLAY if c not in optional or _any_set(table[c])]
    # Per-classifier accuracies only when some row averages over more than one classifier.
    if table["classifier"].astype(str).str.contains(",").any():
        at = header.index("accuracy_best") + 1
        header[at:at] = [c for c in table.columns if c.startswith(PER_CLASSIFIER) and c not in COLUMNS]
    titles = [_HEADER.get(c, f"{c} (%)" if c.startswith(PER_CLASSIFIER) else c) for c in header]
    lines = ["| " + " | ".join(titles) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for _, row in table.iterrows():
        cells = []
        for column in header:
            if column == "protocol":
                value = protocol_label(row["protocol"], row["dp_safe"])
            elif column == "selected_epoch":
                value = _selected_epochs(row)
            else:
                value = row[column]
            cells.append(_cell(column, value).replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _any_set(column: pd.Series) -> bool:
    """A column worth showing: some value present (and, for a flag, some value true)."""
    values = [v for v in column if not _missing(v)]
    return any(bool(v) for v in values) if values and all(isinstance(v, (bool, np.bool_)) for v in values) \
        else bool(values)


def _selected_epochs(row: pd.Series) -> str | float:
    """Each classifier's selected epoch as "2/10" (1 = the checkpoint after the first epoch, of E epochs)."""
    chosen = {c[len(SELECTED_EPOCH):]: row[c] for c in row.index
              if c.startswith(SELECTED_EPOCH) and not _missing(row[c])}
    if not chosen:
        return math.nan
    of = "" if _missing(row["epochs"]) else f"/{int(row['epochs'])}"
    parts = {name: f"{int(epoch)}{of}" for name, epoch in chosen.items()}
    return next(iter(parts.values())) if len(parts) == 1 else ", ".join(f"{n} {v}" for n, v in parts.items())


def _cell(column: str, value: Any) -> str:
    if _missing(value):
        return "n/a"
    if column in ("n_synthetic", "n_sensitive"):
        return str(int(value)) if isinstance(value, (int, float, np.number)) else str(value)
    if column == "delta":
        return f"{float(value):.3g}"
    if column == "public_nearer":
        return "YES (see evaluate's warning)" if bool(value) else "no"
    if column.startswith(PER_CLASSIFIER) or column == "accuracy":  # accuracy_best/_mean too: one unit, percent
        return f"{100 * float(value):.2f}"
    if column == "kid_inception":
        return f"{KID_SCALE * float(value):.4g}"
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


def run_labels(table: pd.DataFrame) -> dict[str, str]:
    """Legend label per run: the directory as the user gave it, with its method and ledger epsilon."""
    labels = {}
    for _, row in table.drop_duplicates("run").iterrows():
        facts = [str(row["method"])] if not _missing(row["method"]) else []
        if not _missing(row["epsilon"]):
            facts.append(f"ε={row['epsilon']:.3g}")
        labels[row["run"]] = f"{row['run']} ({', '.join(facts)})" if facts else str(row["run"])
    return labels


def run_colours(runs: Iterable[str]) -> dict[str, tuple]:
    """One colour per run, in the order given; every figure of a report takes its colours from this map."""
    from matplotlib import colormaps

    runs = list(dict.fromkeys(runs))
    cmap = colormaps["tab10" if len(runs) <= 10 else "tab20"]
    return {run: cmap(i % cmap.N) for i, run in enumerate(runs)}


# Runs on one trend line must be comparable: the same method, data (set and declared N), δ, protocol,
# classifiers and feature network. ε is what varies along the line.
CURVE_KEYS = ("method", "sensitive", "n_sensitive", "delta", "protocol", "classifier", "feature_network")


def privacy_utility_figure(table: pd.DataFrame, colours: dict[str, tuple] | None = None):
    """Accuracy (percent) vs epsilon and FID vs epsilon, each run in its colour from `colours` (default:
    run_colours over the table's runs); non-DP rows as x; comparable runs joined by a line."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(11, 5), layout="constrained")
    ax_acc, ax_fid = fig.subplots(1, 2)
    # Inception FID when any run has it (then only those runs' networks label the axis), else domain FID.
    fid_column = "fid_inception" if table["fid_inception"].notna().any() else "fid_domain"
    labels = run_labels(table)
    colours = colours if colours is not None else run_colours(labels)
    handles = []
    any_not_dp = False
    for run, label in labels.items():
        colour = colours[run]
        rows = table[table["run"] == run]
        if (rows["protocol"] == NOT_EVALUATED).all():
            label += " (not evaluated)"
        handles.append(Line2D([], [], color=colour, marker="o", linestyle="", label=label))
        for _, row in rows.iterrows():
            if row["protocol"] == NOT_EVALUATED:
                continue
            not_dp = protocol_label(row["protocol"], row["dp_safe"]).endswith("(NOT DP)")
            any_not_dp |= not_dp
            style = dict(color=colour, marker="x" if not_dp else "o", s=60, label=label)
            if not _missing(row["accuracy"]):
                ax_acc.scatter([row["epsilon"]], [100 * row["accuracy"]], **style)
            if not _missing(row[fid_column]):
                ax_fid.scatter([row["epsilon"]], [row[fid_column]], **style)
    for curve in _curves(table, ax_acc, ax_fid, fid_column):
        handles.append(Line2D([], [], color="grey", linestyle=_CURVE_STYLE[curve["protocol"]], label=curve["label"]))
    if any_not_dp:
        handles.append(Line2D([], [], color="black", marker="x", linestyle="", label="NOT DP (test-set selection)"))
    epsilon_label = "ε (privacy ledger, at each run's δ)"
    ax_acc.set_xlabel(epsilon_label)
    ax_acc.set_ylabel("accuracy on the real test set (%)")
    ax_acc.set_title("utility")
    ax_fid.set_xlabel(epsilon_label)
    networks = table.loc[table[fid_column].notna(), "feature_network"]
    ax_fid.set_ylabel(fid_axis_label(networks if len(networks) else table["feature_network"]), fontsize=8)
    ax_fid.set_title("fidelity (lower is better)")
    for ax in (ax_acc, ax_fid):
        ax.grid(alpha=0.3)
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 2), fontsize=8)
    return fig


_CURVE_STYLE = {"dp-safe-selection": "-", "noisy-val": "--"}


def comparable_groups(table: pd.DataFrame) -> list[pd.DataFrame]:
    """The DP-safe results that one trend line may join: rows sharing every CURVE_KEYS value (δ to 6
    significant digits), from at least two runs, each sorted by epsilon."""
    rows = table[table["protocol"].isin(list(_CURVE_STYLE))].copy()
    rows["_delta_key"] = [f"{d:.6g}" if not _missing(d) else "" for d in rows["delta"]]
    keys = [("_delta_key" if key == "delta" else key) for key in CURVE_KEYS]
    groups = []
    for _, group in rows.groupby(keys, dropna=False, sort=False):
        if group["run"].nunique() >= 2:
            groups.append(group.drop(columns="_delta_key").sort_values("epsilon"))
    return groups


def _curves(table: pd.DataFrame, ax_acc, ax_fid, fid_column: str) -> list[dict]:
    """Draw one line per comparable group through its runs' points in order of epsilon."""
    drawn = []
    for group in comparable_groups(table):
        first = group.iloc[0]
        n = "" if _missing(first["n_sensitive"]) else f", N={int(first['n_sensitive'])}"
        label = (f"line: {first['method']} on {first['sensitive']}{n}, δ={first['delta']:.3g}, "
                 f"{first['protocol']}, {first['classifier']}")
        style = dict(color="grey", linewidth=1, linestyle=_CURVE_STYLE[first["protocol"]], label=label, zorder=0)
        ax_acc.plot(group["epsilon"], 100 * group["accuracy"], **style)
        ax_fid.plot(group["epsilon"], group[fid_column], **style)
        drawn.append({"protocol": first["protocol"], "label": label})
    return drawn


def class_counts_figure(counts: dict[str, np.ndarray], labels: dict[str, str] | None = None,
                        colours: dict[str, tuple] | None = None):
    """Grouped bars: for each class, the number of synthetic images of that class per run (`counts` keyed
    by run; legend `labels` and `colours` keyed the same way, default the run itself and run_colours)."""
    from matplotlib.figure import Figure

    labels = labels or {run: str(run) for run in counts}
    colours = colours if colours is not None else run_colours(counts)
    fig = Figure(figsize=(max(6.0, 0.6 * max((len(c) for c in counts.values()), default=1) + 3), 4),
                 layout="constrained")
    ax = fig.subplots()
    n_classes = max((len(c) for c in counts.values()), default=0)
    width = 0.8 / max(len(counts), 1)
    for i, (run, per_class) in enumerate(counts.items()):
        x = np.arange(len(per_class)) - 0.4 + width * (i + 0.5)
        ax.bar(x, per_class, width=width, color=colours[run], label=labels.get(run, str(run)))
    ax.set_xticks(np.arange(n_classes))
    ax.set_xlabel("class label")
    ax.set_ylabel("synthetic images")
    ax.set_title("class counts of the synthetic sets")
    if counts:
        fig.legend(loc="outside right upper", fontsize=8)  # outside: never hides a bar
    return fig


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


def _sample_name(path: Path, taken: set[str]) -> str:
    """samples_<directory name>.png: the name the user gave the run, made safe for a file name."""
    name = path.name or path.resolve().name
    stem = "samples_" + (re.sub(r"[^A-Za-z0-9._-]", "_", name).strip(".") or "run")
    name, n = f"{stem}.png", 2
    while name in taken:  # runs/a/x and runs/b/x share a directory name
        name, n = f"{stem}-{n}.png", n + 1
    taken.add(name)
    return name


def report_figures(table: pd.DataFrame, counts: dict[str, np.ndarray]) -> dict:
    """The report's figures by file name, all coloured from one run_colours map (a run keeps its colour
    from plot to plot, whichever runs have a synthetic set) and labelled by the runs' directories."""
    labels = run_labels(table)
    colours = run_colours(labels)
    figures = {PRIVACY_UTILITY_PNG: privacy_utility_figure(table, colours)}
    if counts:
        figures[CLASS_COUNTS_PNG] = class_counts_figure(counts, labels, colours)
    return figures


def write_report(run_paths: Sequence[str | Path], out_dir: str | Path = DEFAULT_OUT) -> Report:
    """Collect the table and write privacy_utility.png, class_counts.png (when any run has a
    synthetic set) and samples_<directory name>.png per run with a grid. Returns the table and the
    paths written. An unreadable run or a changed artifact raises before anything is written."""
    runs = _open_runs(run_paths)
    table = collect_results([path for path, _ in runs])

    files: dict[str, bytes] = {}
    counts: dict[str, np.ndarray] = {}
    taken: set[str] = set()
    for path, run in runs:
        per_class = class_counts(run)
        if per_class is not None:
            counts[str(path)] = per_class
        if run.has_artifact(GRID):
            files[_sample_name(path, taken)] = run.read_artifact(GRID)

    rendered = {name: _png_bytes(fig) for name, fig in report_figures(table, counts).items()}
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
