"""Run the `small` recipes of the GAN and mean-embedding methods and print them beside the
published figures, one row per (method, epsilon), all measured in this one run.

    python benchmarks/small_recipes.py [--methods dp-merf,dp-gan] [--eps 1,10] [--fresh] [--out FILE.md]

Each row runs `make -f recipes/pipeline.mk RECIPE=recipes/<method>/fashionmnist-small[-eps1].yaml`
(all five stages) in its own process and reports: the epsilon the run's ledger spent (PRV
upper bound), accuracy under DP-safe selection (the recipe's classifier), FID on the named
domain network (NOT Inception: not comparable to the papers' FID), wall time and the peak
resident memory of the pipeline's processes. A run that pipeline.mk already completed (its stamps exist) is
reused, its time taken from its manifest's stage times (which leave out each command's start-up,
about 5 s per stage); --fresh deletes it first.

Published: DPImageBench (Gong et al. 2025), Fashion-MNIST, accuracy at eps 1 / 10, Inception FID
and full-size models; EFSGD (arXiv 2601.15061), Fashion-MNIST FID 83.48. Our small recipes use
data subsets, small models and few steps on 2 CPU cores, so they are expected to fall short.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("dp-merf", "dp-ntk", "dp-kernel", "dp-gan", "gs-wgan", "efsgd-gan")
# DPImageBench Table (Fashion-MNIST, DP-safe accuracy %, eps = 1 / 10).
PUBLISHED_ACCURACY = {"dp-merf": (62.2, 62.2), "dp-ntk": (64.4, 76.3), "dp-kernel": (68.4, 70.0),
                      "gs-wgan": (52.7, 56.7), "dp-gan": (71.8, 70.3)}
PUBLISHED_FID = {"efsgd-gan": "83.48 (EFSGD paper, Inception)"}


def recipe_path(method: str, eps: float) -> Path:
    suffix = "" if eps == 10 else f"-eps{eps:g}"
    return ROOT / "recipes" / method / f"fashionmnist-small{suffix}.yaml"


def run_dir(recipe: Path) -> Path:
    """The run directory recipes/pipeline.mk itself would use, so runs made with `make` are reused."""
    digest = hashlib.sha256(recipe.read_bytes()).hexdigest()[:8]
    return ROOT / "runs" / f"{recipe.parent.name}-{recipe.stem}-{digest}"


def run_recipe(recipe: Path, run: Path, dpsynth: str) -> tuple[float, float, int]:
    """(wall seconds, peak RSS in MB over the pipeline's processes, return code)."""
    # A fresh child process per recipe: RUSAGE_CHILDREN then covers exactly this run's processes.
    code = ("import resource, subprocess, sys, json, time\n"
            "t = time.perf_counter()\n"
            "rc = subprocess.call(sys.argv[1:])\n"
            "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
            "print(json.dumps({'rc': rc, 'seconds': time.perf_counter() - t, 'peak_mb': peak}))\n")
    command = [sys.executable, "-c", code, "make", "--no-print-directory", "-f", "recipes/pipeline.mk",
               f"DPSYNTH={dpsynth}", f"RECIPE={recipe.relative_to(ROOT)}", f"RUN={run.relative_to(ROOT)}"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    if summary["rc"]:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
    return summary["seconds"], summary["peak_mb"], summary["rc"]


def row(method: str, eps: float, run: Path, seconds: float | None, peak: float | None, rc: int) -> dict:
    published = PUBLISHED_ACCURACY.get(method)
    out = {"method": method, "eps_target": eps, "status": "ok" if rc == 0 else f"failed (rc {rc})",
           "published_acc": (published[0] if eps == 1 else published[1]) if published and eps in (1, 10) else None,
           "published_fid": PUBLISHED_FID.get(method)}
    manifest_file = run / "manifest.yaml"
    if manifest_file.is_file():
        manifest = yaml.safe_load(manifest_file.read_text())
        out["eps_spent"] = manifest["privacy"]["epsilon"]
        out["events"] = "; ".join(f"{e['stage']}:{e['mechanism']}" for e in manifest["privacy"]["events"])
        if seconds is None:  # reused run: the stages' own recorded times and peak memory
            seconds = _recorded_seconds(manifest)
            peaks = [e["peak_rss_mb"] for e in manifest["stages"].values() if e.get("peak_rss_mb")]
            peak = max(peaks) if peaks else None
    results = run / "results.csv"
    if results.is_file():
        table = pd.read_csv(results)
        safe = table[table["dp_safe"].astype(bool)].iloc[-1]
        out["accuracy"] = round(100 * float(safe["accuracy"]), 1)
        fid_keys = [k for k in ("fid_inception", "fid_domain") if k in safe and pd.notna(safe[k])]
        if fid_keys:
            out["fid"] = round(float(safe[fid_keys[0]]), 1)
            out["fid_features"] = "inception" if fid_keys[0] == "fid_inception" else str(safe["feature_network"])
    out["wall_s"] = round(seconds, 1) if seconds is not None else None
    out["peak_mb"] = round(peak) if peak is not None else None
    return out


def _recorded_seconds(manifest: dict) -> float | None:
    from datetime import datetime

    starts, ends = [], []
    for entry in manifest["stages"].values():
        if entry.get("started") and entry.get("ended"):
            starts.append(datetime.fromisoformat(entry["started"]))
            ends.append(datetime.fromisoformat(entry["ended"]))
    return (max(ends) - min(starts)).total_seconds() if starts else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--eps", default="1,10")
    parser.add_argument("--fresh", action="store_true", help="delete earlier benchmark runs of these recipes first")
    parser.add_argument("--dpsynth", default=os.environ.get("DPSYNTH", f"{sys.executable} -m dpsynth"))
    parser.add_argument("--out", type=Path, help="also write the table as Markdown to this file")
    args = parser.parse_args()
    rows = []
    for method in args.methods.split(","):
        for eps in (float(e) for e in args.eps.split(",")):
            eps = int(eps) if eps.is_integer() else eps
            recipe = recipe_path(method, eps)
            if not recipe.is_file():
                rows.append({"method": method, "eps_target": eps, "status": f"no recipe {recipe.relative_to(ROOT)}"})
                continue
            run = run_dir(recipe)
            if args.fresh:
                shutil.rmtree(run, ignore_errors=True)  # its make stamps (RUN/.make/) with it
            reused = (run / ".make" / "evaluate").is_file()
            seconds, peak, rc = (None, None, 0) if reused else run_recipe(recipe, run, args.dpsynth)
            rows.append(row(method, eps, run, seconds, peak, rc))
            print(f"{method} eps={eps}: {rows[-1]}", file=sys.stderr, flush=True)
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(table.drop(columns=[c for c in ("events",) if c in table]).to_string(index=False))
    if "accuracy" in table and "published_acc" in table:
        ratio = (table["accuracy"] / table["published_acc"]).round(2)
        print("\naccuracy / published:", dict(zip(table["method"] + "@" + table["eps_target"].astype(str), ratio)))
    if args.out:
        args.out.write_text(table.to_markdown(index=False) if _has_tabulate() else table.to_csv(index=False))


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"\nbenchmark wall time: {time.perf_counter() - started:.0f} s", file=sys.stderr)
