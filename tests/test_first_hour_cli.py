"""A new user's first hour (issue 13): make's stamps out of `runs/*`, `report` over a glob, tables
printed in full to a pipe, help texts, a start-up without torch, and the smaller messages."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml

from cli_helpers import NO_TORCH_PRELUDE, dpsynth
from dpsynth.cli.app import app
from dpsynth.cli.main import main
from dpsynth.pipeline.rundir import RunDir
from dpsynth.privacy.accountant import compose_epsilon
from dpsynth.privacy.events import GaussianEvent, PoissonGaussianEvent

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PIPELINE_MK = ROOT / "recipes" / "pipeline.mk"
STAGES = ("select-public", "pretrain", "finetune", "generate", "evaluate")


def ledger_run(path: Path, method: str = "privimage-cvae", completed: tuple[str, ...] = ()) -> Path:
    """A run written through RunDir: the two events of a PrivImage run, no training."""
    run = RunDir.create(path, method=method, public=None, delta=1e-5,
                        sensitive={"name": "tiny", "size": 60000, "num_classes": 10, "resolution": 28,
                                   "channels": 1, "fingerprint": "sha256:0"},
                        settings={"sensitive": "tiny", "public": None, "seed": 0})
    events = [GaussianEvent("select-public", 5.0), PoissonGaussianEvent("finetune", 0.61, 0.00855, 117)]
    with run.lock():
        for i, event in enumerate(events):
            run.record_event(event, compose_epsilon(events[:i + 1], run.delta))
        for stage in completed:
            run.begin_stage(stage, {}, inputs=[])
            run.end_stage(stage)
    return path


# ---- item 1: make's stamps and `report runs/*` ----------------------------------------------------
def make(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", "-f", "recipes/pipeline.mk", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def project(tmp_path):
    """A copy of the project's make pipeline and demo recipe, to run make against."""
    (tmp_path / "recipes").mkdir()
    shutil.copy(PIPELINE_MK, tmp_path / "recipes" / "pipeline.mk")
    shutil.copy(ROOT / "recipes" / "demo.yaml", tmp_path / "recipes" / "demo.yaml")
    return tmp_path


def test_make_stamps_live_inside_the_run_directory(project):
    dry = make("-n", "RUN=runs/r", cwd=project)
    assert dry.returncode == 0, dry.stderr
    assert "mkdir -p runs/r/.make && touch runs/r/.make/select-public" in dry.stdout
    assert ".make " not in dry.stdout.replace("runs/r/.make", "")  # nothing beside the run

    # After a complete run (stamps in stage order) make has nothing left to do; a stale recipe redoes all.
    stamps = project / "runs" / "r" / ".make"
    stamps.mkdir(parents=True)
    for stage in STAGES:
        (stamps / stage).touch()
        os.utime(stamps / stage, (1e9 + STAGES.index(stage), 1e9 + STAGES.index(stage)))
    os.utime(project / "recipes" / "demo.yaml", (1e9 - 10, 1e9 - 10))
    assert make("-q", "RUN=runs/r", "runs/r/.make/evaluate", cwd=project).returncode == 0
    rerun = make("-n", "RUN=runs/r", cwd=project)
    assert "select-public" not in rerun.stdout and "ledger --run runs/r" in rerun.stdout
    # Deleting the run deletes its stamps: make starts over instead of believing the run is done.
    shutil.rmtree(project / "runs" / "r")
    assert make("-q", "RUN=runs/r", "runs/r/.make/evaluate", cwd=project).returncode == 1


def test_stamps_of_the_old_layout_move_into_the_run(project):
    old = project / "runs" / "r.make"
    old.mkdir(parents=True)
    (project / "runs" / "r").mkdir()
    for i, stage in enumerate(STAGES):
        (old / stage).touch()
        os.utime(old / stage, (1e9 + i, 1e9 + i))
    os.utime(project / "recipes" / "demo.yaml", (1e9 - 10, 1e9 - 10))
    # A finished run stays finished (a rerun would spend its privacy budget again).
    assert make("-q", "RUN=runs/r", "runs/r/.make/evaluate", cwd=project).returncode == 0
    assert not old.exists() and sorted(p.name for p in (project / "runs" / "r" / ".make").iterdir()) == \
        sorted(STAGES)


def test_make_uses_the_projects_venv_without_activation(project):
    assert "\ndpsynth --recipe recipes/demo.yaml select-public" in "\n" + make("-n", "RUN=runs/r", cwd=project).stdout
    venv_dpsynth = project / ".venv" / "bin" / "dpsynth"
    venv_dpsynth.parent.mkdir(parents=True)
    venv_dpsynth.write_text("#!/bin/sh\n")
    venv_dpsynth.chmod(0o755)
    dry = make("-n", "RUN=runs/r", cwd=project).stdout
    assert f"{venv_dpsynth} --recipe recipes/demo.yaml select-public --run runs/r" in dry
    assert f"{venv_dpsynth} ledger --run runs/r --rdp" in dry
    assert "other-dpsynth --recipe" in make("-n", "RUN=runs/r", "DPSYNTH=other-dpsynth", cwd=project).stdout


def test_report_over_a_glob_skips_folders_that_are_not_runs(tmp_path, capsys):
    runs = tmp_path / "runs"
    run = ledger_run(runs / "demo-1234abcd")
    (runs / "demo-1234abcd.make").mkdir()  # the old stamp layout, and any other stray folder
    (runs / "notes").mkdir()
    assert main(["report", str(run), str(runs / "demo-1234abcd.make"), str(runs / "notes"),
                 "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: skipping {runs / 'demo-1234abcd.make'}: not a run directory (no manifest.yaml)",
                        f"warning: skipping {runs / 'notes'}: not a run directory (no manifest.yaml)"]
    # No run among the arguments: still an error, exit 2, one line.
    assert main(["report", str(runs / "notes"), "--out", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {runs / 'notes'} is not a run directory (no manifest.yaml)")
    assert not (tmp_path / "out2").exists()


def test_report_defaults_spelled_in_the_cli_match_the_library():
    from dpsynth import reporting
    from dpsynth.cli import report

    assert (report.DEFAULT_OUT, report.FORMATS) == (reporting.DEFAULT_OUT, reporting.FORMATS)


# ---- item 4: tables printed in full to a pipe -----------------------------------------------------
def test_methods_piped_prints_every_train_opts_default_in_full(capsys):
    from dpsynth.cli.methods import describe

    assert main(["methods"]) == 0
    printed = capsys.readouterr().out
    assert "…" not in printed
    # A long value (PE's list of variation degrees) wraps inside its cell: compare without the layout.
    flat = "".join(printed.replace("│", " ").split())
    for row in describe():
        assert row["method"] in printed
        for key, value in row["train_opts"].items():
            assert "".join(f"{key}={value}".split()) in flat, (row["method"], key)


def test_a_long_result_value_wraps_and_is_never_cut(capsys):
    from dpsynth.cli.common import emit

    words = [f"word{i:03d}" for i in range(60)]
    emit({"query_network": "querynet(mnist5k,28px,1ch):sha256:2402e3590e89", "note": " ".join(words)}, False, "t")
    printed = capsys.readouterr().out
    assert "…" not in printed and "querynet(mnist5k,28px,1ch):sha256:2402e3590e89" in printed
    assert all(word in printed for word in words)
    assert max(len(line) for line in printed.splitlines()) < 120  # wrapped, not one 500-column line


# ---- item 6: help texts and a start-up without torch ----------------------------------------------
def _commands():
    group = typer.main.get_command(app)
    return [("dpsynth", group), *group.commands.items()]


def test_every_option_of_every_command_has_a_help_text():
    missing = [f"{name} {param.opts[0]}" for name, command in _commands() for param in command.params
               if param.param_type_name == "option" and not (param.help or "").strip()]
    assert not missing, "options without help: " + ", ".join(missing)


def test_the_help_walk_sees_every_command():
    names = [name for name, _ in _commands()]
    assert set(STAGES) | {"ledger", "report", "methods", "audit"} <= set(names)


def test_method_help_lists_exactly_the_registered_methods():
    from dpsynth.cli.method_names import method_names
    from dpsynth.methods import METHODS

    assert method_names() == tuple(sorted(METHODS))
    for name, command in _commands():
        for param in command.params:
            if "--method" in param.opts:
                assert all(m in param.help for m in METHODS), name


@pytest.mark.parametrize("argv", [["--help"], ["finetune", "--help"], ["report", "--help"]])
def test_help_shows_no_type_for_flags(argv, capsys):
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    flags = [line for line in lines if "--help" in line or "--json" in line or "--secure" in line]
    assert flags and not any("<bool>" in line for line in lines), "\n".join(flags)
    if argv[0] == "finetune":
        assert any("--eps" in line and "<float>" in line for line in lines)  # options with a value keep theirs


_NO_TORCH = NO_TORCH_PRELUDE + """
from dpsynth.cli.main import main
rc = main(sys.argv[1:])
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
sys.exit(rc)
"""


def no_torch_cli(*args: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin", "COLUMNS": "80",
           "DPSYNTH_HOME": os.environ["DPSYNTH_HOME"]}
    return subprocess.run([sys.executable, "-c", _NO_TORCH, *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_help_an_argument_error_and_the_ledger_need_no_torch(tmp_path):
    for argv in (["--help"], ["finetune", "--help"]):
        proc = no_torch_cli(*argv)
        assert proc.returncode == 0 and "Usage: dpsynth" in proc.stdout, proc.stderr
    proc = no_torch_cli("finetune", "--eps", "10%")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --eps 10% is not allowed"), proc.stderr
    # The ledger, printed to a pipe: stage and mechanism names in full (item 4), without torch.
    run = ledger_run(tmp_path / "run")
    proc = no_torch_cli("ledger", "--run", str(run))
    assert proc.returncode == 0, proc.stderr
    assert "select-public" in proc.stdout and "poisson_gaussian" in proc.stdout and "…" not in proc.stdout
    assert "epsilon = " in proc.stdout


def test_the_torch_blocker_blocks_a_command_that_needs_torch():
    proc = no_torch_cli("methods")
    assert proc.returncode != 0 and "blocked by the test" in proc.stderr


# ---- item 8: smaller messages ---------------------------------------------------------------------
@pytest.mark.parametrize("argv,expected", [
    (["finetune", "--eps", "10%"],
     "error: --eps 10% is not allowed; input should be a valid number, unable to parse string as a number "
     "(see 'dpsynth finetune --help')"),
    (["generate", "--n", "1e3"],
     "error: --n 1e3 is not allowed; input should be a valid integer, unable to parse string as an integer "
     "(see 'dpsynth generate --help')"),
])
def test_an_unparsable_value_is_named(argv, expected, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == expected


@pytest.mark.parametrize("method,completed,missing", [
    ("privimage-cvae", ("select-public",), ["pretrain", "finetune", "generate"]),
    ("privimage-cvae", ("select-public", "pretrain", "finetune"), ["generate"]),
    ("dp-merf", (), ["finetune", "generate"]),  # a method without select-public and pretrain
])
def test_evaluate_too_early_names_every_missing_stage(method, completed, missing, tmp_path, capsys):
    run = ledger_run(tmp_path / "run", method=method, completed=completed)
    before = (run / "manifest.yaml").read_bytes()
    assert main(["evaluate", "--run", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert ", ".join(f"'{s}'" for s in missing) + " to have completed" in err
    assert "run " + ", then ".join(f"'dpsynth {s}'" for s in missing) + " on it first" in err
    assert (run / "manifest.yaml").read_bytes() == before


def test_limit_says_when_it_moves_the_default_delta(tmp_path):
    from dpsynth.notices import NOTICES
    from dpsynth.pipeline.common import DataSettings, open_or_create_run
    from dpsynth.privacy.accountant import default_delta

    NOTICES.clear()
    settings = DataSettings(sensitive="digits", public=None, limit=600)
    run, sensitive = open_or_create_run(tmp_path / "run", method=None, settings=settings, delta=None)
    n = len(sensitive)
    assert run.delta == pytest.approx(default_delta(n)) and not (tmp_path / "run").exists()
    assert NOTICES == [f"delta = 1/(N ln N) = {default_delta(n):.3g} for the N = {n:,} images `limit` keeps (the "
                       f"whole set, N = 1,797, would give {default_delta(1797):.3g}); pass `delta` to set it"]
    NOTICES.clear()
    open_or_create_run(tmp_path / "run", method=None, settings=settings, delta=1e-5)  # delta given: no note
    open_or_create_run(tmp_path / "run", method=None, settings=DataSettings(sensitive="digits", public=None),
                       delta=None)  # no limit: no note
    assert NOTICES == []


def test_notes_reach_the_user_in_flags(capsys):
    from dpsynth.notices import NOTICES

    from dpsynth.cli.main import _print_notices

    # A note left by a library call made earlier in the process is not the next command's to print.
    NOTICES.append("stale note from an earlier call")
    assert main(["--help"]) == 0  # (also loads the flag names the notes are mapped to)
    assert "stale note" not in capsys.readouterr().err and NOTICES == []
    NOTICES.append("for the N = 10 images `limit` keeps; pass `delta` to set it")
    _print_notices()  # what main does after a command
    assert "note: for the N = 10 images --limit keeps; pass --delta to set it" in capsys.readouterr().err
    assert NOTICES == []


def test_select_public_records_when_it_started(tmp_path, monkeypatch):
    import time

    from dpsynth.pipeline import select_public
    from dpsynth.pipeline.common import DataSettings

    real_predict = select_public.predict_topk

    def slow_predict(*args, **kwargs):  # labelling the sensitive set: work done before the stage's entry opens
        time.sleep(1.1)
        return real_predict(*args, **kwargs)

    monkeypatch.setattr(select_public, "predict_topk", slow_predict)
    # test_cli_pipeline's query network (mnist5k at 28 px, cached): no extra training for the suite.
    settings = DataSettings(sensitive="fashionmnist", public="mnist5k", limit=300)
    select_public.run_select_public(tmp_path / "run", settings, sigma=5.0)
    manifest = yaml.safe_load((tmp_path / "run" / "manifest.yaml").read_text())
    started = dt.datetime.fromisoformat(manifest["stages"]["select-public"]["started"])
    event = dt.datetime.fromisoformat(manifest["privacy"]["events"][0]["time"])
    assert (event - started).total_seconds() >= 1  # started is when the work began, not when it ended
