"""Start-up time of the commands that should answer at once, beside what the CLI's own libraries cost.

    python benchmarks/startup.py [--repeat 7] [--with-torch] [--src DIR]

Each command runs in a fresh process (`python -m dpsynth ...` on this checkout's src/), the
repetitions interleaved round-robin so a busy machine slows every row alike; the table gives the
median and the fastest wall time and the median's ratio to the baseline `python -c "import typer,
rich"`. A one-command Typer app's `--help` is the floor of any Typer CLI with rich help (Typer
renders it with rich's Markdown support). `dpsynth ledger` reads a run written here through RunDir
(two events, no training; most of its time is the PRV composition). `--with-torch` adds `dpsynth
methods` (it loads every method class, and so torch) and `python -c "import torch"` for scale.
`--src DIR` (repeatable) times other source trees too, e.g. an export of the commit before a change,
their rows interleaved with this one's and labelled by the directory.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"

MAKE_RUN = """
import sys
from dpsynth.pipeline.rundir import RunDir
from dpsynth.privacy.accountant import compose_epsilon
from dpsynth.privacy.events import GaussianEvent, PoissonGaussianEvent
run = RunDir.create(sys.argv[1], method="privimage-cvae", public=None, delta=1e-5,
                    sensitive={"name": "bench", "size": 60000, "num_classes": 10, "resolution": 28, "channels": 1,
                               "fingerprint": "sha256:0"},
                    settings={"sensitive": "bench", "public": None, "seed": 0})
events = [GaussianEvent("select-public", 5.0), PoissonGaussianEvent("finetune", 0.61, 0.00855, 117)]
with run.lock():
    for i, event in enumerate(events):
        run.record_event(event, compose_epsilon(events[:i + 1], run.delta))
"""


MINIMAL_TYPER_APP = """
import sys, typer
app = typer.Typer(add_completion=False)
@app.command()
def hello(name: str = typer.Option("x", help="A name.")) -> None:
    pass
app(args=sys.argv[1:], prog_name="minimal")
"""


def commands(run: Path, with_torch: bool, sources: list[Path]) -> dict[str, tuple[list[str], dict]]:
    """{row: (argv, environment)}; the dpsynth rows once per source tree."""
    env = dict(os.environ)
    rows = {'python -c "import typer, rich"': ([sys.executable, "-c", "import typer, rich"], env),
            "one-command Typer app --help": ([sys.executable, "-c", MINIMAL_TYPER_APP, "--help"], env)}
    for src in sources:
        label = "" if len(sources) == 1 else f" [{src}]"
        src_env = {**env, "PYTHONPATH": str(src) + os.pathsep + env.get("PYTHONPATH", "")}
        dpsynth = [sys.executable, "-m", "dpsynth"]
        rows.update({f"dpsynth --help{label}": ([*dpsynth, "--help"], src_env),
                     f"dpsynth finetune --help{label}": ([*dpsynth, "finetune", "--help"], src_env),
                     f"dpsynth finetune --eps 10% (argument error){label}": ([*dpsynth, "finetune", "--eps", "10%"],
                                                                             src_env),
                     f"dpsynth ledger --run R{label}": ([*dpsynth, "ledger", "--run", str(run)], src_env)})
        if with_torch:
            rows[f"dpsynth methods (imports torch){label}"] = ([*dpsynth, "methods"], src_env)
    if with_torch:
        rows['python -c "import torch"'] = ([sys.executable, "-c", "import torch"], env)
    return rows


def time_once(argv: list[str], env: dict) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode not in (0, 2):  # 2: the argument error is the expected outcome of its row
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7, help="runs of each command (median reported)")
    parser.add_argument("--with-torch", action="store_true", help="also time `dpsynth methods` and `import torch`")
    parser.add_argument("--src", type=Path, action="append", help="a dpsynth source tree to time (repeatable; "
                        "default: this checkout's src/)")
    args = parser.parse_args()
    sources = [path.resolve() for path in args.src or [SRC]]
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        subprocess.run([sys.executable, "-c", MAKE_RUN, str(run)], check=True,
                       env={**os.environ, "PYTHONPATH": str(SRC), "DPSYNTH_HOME": tmp})
        rows = commands(run, args.with_torch, sources)
        for argv, env in rows.values():  # one untimed run each: the file cache warm for every row alike
            time_once(argv, env)
        times: dict[str, list[float]] = {name: [] for name in rows}
        for _ in range(args.repeat):
            for name, (argv, env) in rows.items():
                times[name].append(time_once(argv, env))
    baseline = statistics.median(next(iter(times.values())))
    width = max(map(len, times))
    print(f"{'command':<{width}}  median s  fastest s  × baseline   ({args.repeat} runs each, interleaved; "
          f"{os.cpu_count()} CPUs)")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<{width}}  {median:8.3f}  {min(values):9.3f}  {median / baseline:10.2f}")


if __name__ == "__main__":
    main()
