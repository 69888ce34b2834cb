"""Every registered method on Fashion-MNIST at eps 1 and 10, beside DPImageBench's published row.

    python benchmarks/leaderboard.py [--methods all|dp-merf,dpdm] [--eps 1,10] [--tier small|cpu-hour]
                                     [--protocol dp-safe-selection] [--classifier cnn] [--eval-epochs 5]
                                     [--rows runs/leaderboard/rows.json] [--out docs/leaderboard.md] [--fresh]

One row per (method, eps): the method's recipe of the tier (`recipes/<method>/fashionmnist-<tier>.yaml`,
`-eps1` for eps 1) runs all five stages (`dpsynth --recipe R <stage> --run RUN`; a stage the method does
not use says so and exits 0), then every row is evaluated under ONE protocol given here (the recipe's
own evaluate settings are overridden), so rows compare methods, not evaluation settings. Reported: the
epsilon the run's ledger spent (PRV upper bound), delta, accuracy (%) with its protocol, classifiers and
how they were combined, FID on the named feature network (domain features are NOT Inception FID), wall
time and the peak resident memory of the row's processes, and whether it kept to the tier's budget.

It resumes: rows already in --rows with status ok are skipped (run it in parts; --fresh reruns them), and
the table is rebuilt from all stored rows each time.

Published: DPImageBench (Gong et al., CCS 2025) Fashion-MNIST rows and FETA-Pro's logs (arXiv 2601.06368):
the MEAN test accuracy of ResNet, WRN and ResNeXt, each at the epoch chosen on a 5,000-image UN-noised
sensitive validation split, full-size models on GPUs. Our default protocol (DP-safe selection, the CNN,
small recipes on 2 CPU cores) differs; `--protocol dpimagebench-val --classifier dpimagebench` reproduces
the published protocol (it is NOT DP, and creates the runs with a 1/12 hold-out as DPImageBench does).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("select-public", "pretrain", "finetune", "generate", "evaluate")
TIER_BUDGET_MIN = {"small": 15, "cpu-hour": 60}  # wall minutes on 2 idle cores
HOLDOUT_PROTOCOLS = ("noisy-val", "dpimagebench-val")
DPIMAGEBENCH_HOLDOUT = 5000 / 60000
# Fashion-MNIST accuracy (%) at eps 1 / 10, mean of ResNet/WRN/ResNeXt (DPImageBench's README and paper
# tables; FETA-Pro's logs). None: not in the sources this project holds.
PUBLISHED_ACCURACY = {
    "dp-merf": (62.2, 62.2), "dp-ntk": (64.4, 76.3), "dp-kernel": (68.4, 70.0), "gs-wgan": (52.7, 56.7),
    "dp-gan": (71.8, 70.3), "pe": (47.9, 57.8), "dpdm": (None, 85.6), "pdp-diffusion": (None, 85.4),
    "privimage": (None, 87.1), "dp-feta": (None, 87.3), "dp-ldm": (62.3, 86.3), "dp-ldm-sd": (75.9, 81.6),
    "dp-lora": (63.5, 83.8), "feta-pro": (82.2, 87.8)}
PUBLISHED_NOTE = "mean of ResNet/WRN/ResNeXt, DPImageBench's un-noised sensitive-val selection (not DP)"


def registered_methods() -> list[str]:
    from dpsynth.methods.registry import METHODS  # importing the package registers every method

    return sorted(METHODS)


def recipe_path(recipes: Path, method: str, tier: str, eps: float) -> tuple[Path | None, dict]:
    """The tier's recipe for (method, eps) and the overrides it needs. Without an eps-1 recipe, the eps-10
    recipe is run with `finetune --eps 1` (the row says so)."""
    base = recipes / method / f"fashionmnist-{tier}.yaml"
    if eps == 10:
        return (base if base.is_file() else None), {}
    own = recipes / method / f"fashionmnist-{tier}-eps{eps:g}.yaml"
    if own.is_file():
        return own, {}
    return (base, {"finetune": ["--eps", f"{eps:g}"]}) if base.is_file() else (None, {})


def evaluation_flags(args) -> list[str]:
    return ["--protocol", args.protocol, "--classifier", args.classifier, "--epochs", str(args.eval_epochs)]


def creating_stages(recipe: Path) -> set[str]:
    """The stages whose recipe section names the sensitive set: whichever runs first creates the run (a
    stage the method does not use exits before that), the others check they describe the same run."""
    sections = yaml.safe_load(recipe.read_text()) or {}
    return {s for s in STAGES[:3] if "sensitive" in (sections.get(s) or {})}


def creation_flags(args) -> list[str]:
    """Run-creation flags the protocol needs (given to the stage that creates the run)."""
    return ["--holdout", f"{DPIMAGEBENCH_HOLDOUT:.6f}"] if args.protocol in HOLDOUT_PROTOCOLS else []


def run_row(recipe: Path, run: Path, dpsynth: list[str], overrides: dict, args) -> tuple[float, float, int, str]:
    """All five stages in one child process: (wall seconds, peak RSS MB over its processes, rc, log tail)."""
    commands, creators = [], creating_stages(recipe)
    for stage in STAGES:
        extra = list(overrides.get(stage, []))
        if stage == "evaluate":
            extra += evaluation_flags(args)
        if stage in creators:
            extra += creation_flags(args)
        commands.append([*dpsynth, "--recipe", str(recipe), stage, "--run", str(run), *extra])
    # A fresh child per row: RUSAGE_CHILDREN then covers exactly this row's processes.
    code = ("import json, resource, subprocess, sys, time\n"
            "t = time.perf_counter(); rc = 0\n"
            "for cmd in json.loads(sys.argv[1]):\n"
            "    rc = subprocess.call(cmd, stdout=sys.stderr)\n"
            "    if rc: break\n"
            "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
            "print(json.dumps({'rc': rc, 'seconds': time.perf_counter() - t, 'peak_mb': peak}))\n")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(commands)], cwd=ROOT, capture_output=True,
                          text=True)
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    return summary["seconds"], summary["peak_mb"], summary["rc"], done.stderr[-2000:]


def measured(run: Path, protocol: str) -> dict:
    """What the run's manifest says: ledger epsilon and delta, and the protocol's result row."""
    manifest_file = run / "manifest.yaml"
    if not manifest_file.is_file():
        return {}
    manifest = yaml.safe_load(manifest_file.read_text())
    out = {"eps_spent": round(float(manifest["privacy"]["epsilon"]), 3), "delta": manifest["privacy"]["delta"],
           "events": "; ".join(f"{e['stage']}:{e['mechanism']}" for e in manifest["privacy"]["events"])}
    result = (manifest.get("results") or {}).get(protocol)
    if result:
        out.update(accuracy=round(100 * float(result["accuracy"]), 1), classifiers=result["classifier"],
                   combined="mean" if "," in str(result["classifier"]) else "single classifier",
                   dp_safe=bool(result["dp_safe"]))
        fid_key = next((k for k in ("fid_inception", "fid_domain") if result.get(k) is not None), None)
        if fid_key:
            out.update(fid=round(float(result[fid_key]), 1), fid_network=result.get("feature_network"),
                       fid_kind="Inception" if fid_key == "fid_inception" else "domain (not Inception)")
    return out


def leaderboard_row(method: str, eps: float, tier: str, recipe: Path | None, overrides: dict, run: Path,
                    seconds, peak, rc: int, args) -> dict:
    published = PUBLISHED_ACCURACY.get(method, (None, None))
    row = {"method": method, "eps_target": eps, "tier": tier, "protocol": args.protocol,
           "measured_on": time.strftime("%Y-%m-%d"),
           "recipe": (str(recipe.relative_to(ROOT) if recipe.is_relative_to(ROOT) else recipe)
                      + "".join(f" ({stage} {' '.join(flags)})" for stage, flags in overrides.items()))
           if recipe else None,
           "status": "no recipe" if recipe is None else "ok" if rc == 0 else f"failed (rc {rc})",
           "published_acc": published[0] if eps == 1 else published[1] if eps == 10 else None}
    if recipe is not None:
        row.update(measured(run, args.protocol))
        row["wall_s"] = round(seconds, 1) if seconds is not None else None
        row["peak_mb"] = round(peak) if peak is not None else None
        row["within_budget"] = seconds is not None and seconds <= 60 * TIER_BUDGET_MIN[tier]
    return row


def row_key(row: dict) -> tuple:
    return row["method"], float(row["eps_target"]), row["tier"], row["protocol"]


def load_rows(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.is_file() else []


def save_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=1, sort_keys=True))
    tmp.replace(path)  # a killed benchmark never leaves a half-written rows file


COLUMNS = ("method", "tier", "eps_target", "eps_spent", "accuracy", "published_acc", "classifiers", "combined",
           "protocol", "fid", "fid_kind", "wall_s", "peak_mb", "within_budget", "status", "measured_on", "recipe")


def table(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    for column in COLUMNS:
        if column not in frame:
            frame[column] = None
    return frame.sort_values(["tier", "eps_target", "method"])[list(COLUMNS)].reset_index(drop=True)


def markdown(frame: pd.DataFrame, command: str) -> str:
    lines = ["# Leaderboard: Fashion-MNIST, every registered method", "",
             f"Written from the stored rows by `{command}`; each row is one run of this script, rows possibly "
             "measured in parts (see each row's `measured_on` and wall time).",
             f"`published_acc`: {PUBLISHED_NOTE}. `accuracy`: this row's protocol and classifiers; `fid_kind` "
             "says which network the FID is on (domain-feature FID is not comparable to published Inception FID).",
             "", "| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join("" if pd.isna(v) else str(v) for v in row.tolist()) + " |")
    return "\n".join(lines) + "\n"


MACHINE_OPTIONS = ("--dpsynth", "--runs")  # where this machine keeps things: they do not change a row


def shown_options(argv: list[str]) -> list[str]:
    """The invocation's options without the machine-local ones, so the table's header is a command that
    another checkout can run as it stands. argparse takes abbreviations (`--run R`), so a prefix counts too."""
    shown, skip = [], False
    for arg in argv:
        name, has_value = arg.split("=", 1)[0], "=" in arg
        machine_local = len(name) > 2 and name.startswith("--") and any(o.startswith(name) for o in MACHINE_OPTIONS)
        if skip:
            skip = False
        elif machine_local:
            skip = not has_value
        else:
            shown.append(arg)
    return shown


NOTES_MARKER = "<!-- notes: kept when the table above is rebuilt -->"


def kept_notes(out: Path) -> str:
    """The hand-written part of an existing --out file (from NOTES_MARKER on), so a rebuild of the table
    keeps the notes on rows measured by other means."""
    text = out.read_text() if out.is_file() else ""
    return "\n" + text[text.index(NOTES_MARKER):] if NOTES_MARKER in text else ""


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="all", help="comma-separated method names, or all (the registry)")
    parser.add_argument("--eps", default="1,10")
    parser.add_argument("--tier", default="small", choices=sorted(TIER_BUDGET_MIN))
    parser.add_argument("--protocol", default="dp-safe-selection")
    parser.add_argument("--classifier", default="cnn")
    parser.add_argument("--eval-epochs", type=int, default=5)
    parser.add_argument("--recipes", type=Path, default=ROOT / "recipes", help="folder of <method>/ recipes")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "leaderboard", help="where the runs go")
    parser.add_argument("--rows", type=Path, help="stored rows (default: RUNS/rows.json)")
    parser.add_argument("--fresh", action="store_true", help="rerun rows already stored")
    parser.add_argument("--dpsynth", default=os.environ.get("DPSYNTH", f"{sys.executable} -m dpsynth"))
    parser.add_argument("--out", type=Path, help="also write the table as Markdown to this file")
    args = parser.parse_args(argv)
    rows_file = args.rows or args.runs / "rows.json"
    methods = registered_methods() if args.methods == "all" else args.methods.split(",")
    stored = {row_key(r): r for r in load_rows(rows_file)}
    dpsynth = shlex.split(args.dpsynth)
    for method in methods:
        for eps in (float(e) for e in args.eps.split(",")):
            eps = int(eps) if eps.is_integer() else eps
            key = (method, float(eps), args.tier, args.protocol)
            if not args.fresh and stored.get(key, {}).get("status") == "ok":
                print(f"{method} eps={eps}: stored, skipped", file=sys.stderr, flush=True)
                continue
            recipe, overrides = recipe_path(args.recipes, method, args.tier, eps)
            run = args.runs / f"{method}-{args.tier}-eps{eps:g}-{args.protocol}"
            shutil.rmtree(run, ignore_errors=True)  # a row is one fresh run: no budget left over from before
            seconds, peak, rc, log = (None, None, 0, "") if recipe is None else run_row(
                recipe, run, dpsynth, overrides, args)
            if rc:
                sys.stderr.write(log)
            stored[key] = leaderboard_row(method, eps, args.tier, recipe, overrides, run, seconds, peak, rc, args)
            save_rows(rows_file, list(stored.values()))
            print(f"{method} eps={eps}: {stored[key]}", file=sys.stderr, flush=True)
    frame = table(list(stored.values()))
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.max_colwidth", 60):
        print(frame.drop(columns=["recipe"]).to_string(index=False))
    if args.out:
        shown = shown_options(argv if argv is not None else sys.argv[1:])
        command = "python benchmarks/leaderboard.py " + " ".join(shown)
        args.out.write_text(markdown(frame, command.strip()) + kept_notes(args.out))
    return frame


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"\nbenchmark wall time: {time.perf_counter() - started:.0f} s", file=sys.stderr)
