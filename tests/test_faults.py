"""Crash safety: real subprocesses are SIGKILLed in the middle of a stage (inside a chosen
durable write, or at a random moment of training), then the run directory is checked:
the manifest is complete and valid or absent (never half-written), the privacy event is on
disk before anything it covers, the stale lock is reported with how to clear it, and
rerunning the stage restarts cleanly."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dpsynth.cli.main import main
from dpsynth.errors import RunDirError
from dpsynth.rundir import LOCK, MANIFEST, RunDir

FAULT = Path(__file__).with_name("fault_inject.py")
# Full batches (q = 1) keep the accountant's calibration fast; Poisson sampling is not what is tested here.
FINETUNE = ["finetune", "--sensitive", "digits", "--limit", "200", "--method", "dp-cvae", "--eps", "1",
            "--epochs", "2", "--batch-size", "200", "--quiet", "--json"]


def killed(kill_at: int, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(FAULT), str(kill_at), *args], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    return result


def check_consistent(run: Path) -> RunDir | None:
    """The invariants a crash must never break."""
    if not (run / MANIFEST).exists():
        return None
    opened = RunDir.open(run)  # parses and passes the schema: never half-written
    for name in opened.manifest["artifacts"]:
        opened.verify_artifact(name)  # every recorded artifact is complete and matches its sha256
    events = [e.stage for e in opened.events()]
    trained = opened.stage_done("finetune") or "generator.pt" in opened.manifest["artifacts"]
    if trained:
        assert "finetune" in events  # write-ahead: the event precedes any DP-SGD output
    return opened


def clear_stale_lock(run: Path, capsys, rerun: list[str]) -> None:
    """A rerun is refused with the dead pid and how to clear it; after clearing, it works."""
    if not (run / LOCK).exists():
        return
    assert main([*rerun, "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert "stale lock from process" in err and f"remove {run / LOCK}" in err, err
    (run / LOCK).unlink()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run = tmp_path_factory.mktemp("done") / "run"
    assert main([*FINETUNE, "--run", str(run)]) == 0
    return run


@pytest.mark.parametrize("kill_at", [2, 4])  # inside synthetic.npz, inside samples.png
def test_generate_killed_mid_write_restarts_cleanly(finished, tmp_path, capsys, kill_at):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    killed(kill_at, "generate", "--n", "50", "--run", str(run), "--quiet")
    opened = check_consistent(run)
    assert opened.manifest["stages"]["generate"]["status"] == "running"
    assert list(run.glob(".*.tmp"))  # the killed writer's half file is there, under a temp name only
    clear_stale_lock(run, capsys, ["generate", "--n", "50"])
    assert main(["generate", "--n", "50", "--run", str(run), "--quiet"]) == 0
    opened = check_consistent(run)
    assert opened.stage_done("generate") and not list(run.glob(".*.tmp"))


@pytest.mark.parametrize("kill_at", [1, 2, 3, 5])
def test_finetune_killed_mid_write_never_under_counts(tmp_path, capsys, kill_at):
    # fsyncs of a new finetune run: 1 manifest (stage begins), 2 manifest (privacy event),
    # 3 generator.pt, 4 manifest (artifact), 5 manifest (stage completed).
    run = tmp_path / "run"
    killed(kill_at, *FINETUNE, "--run", str(run))
    opened = check_consistent(run)
    if kill_at == 1:
        assert opened is None  # the first manifest never appeared: only the lock and a temp file remain
        assert {p.name for p in run.iterdir()} - {LOCK} == {p.name for p in run.glob(".manifest.yaml.*.tmp")}
        return
    events = opened.events()
    if kill_at == 2:
        assert events == []  # killed before the event was durable, so no DP-SGD step had run
    else:
        assert [e.stage for e in events] == ["finetune"]  # DP-SGD ran: its event is on disk
        assert opened.manifest["privacy"]["epsilon"] > 0
    assert ("generator.pt" in opened.manifest["artifacts"]) == (kill_at == 5)
    clear_stale_lock(run, capsys, FINETUNE)
    if kill_at == 2:  # nothing was spent: a plain rerun restarts from scratch and completes
        assert main([*FINETUNE, "--run", str(run)]) == 0
        assert check_consistent(run).stage_done("finetune")
    else:  # the killed attempt stays charged in the ledger that every later stage reads
        assert main(["ledger", "--run", str(run), "--json"]) == 0
        assert '"stage": "finetune"' in capsys.readouterr().out


def test_second_process_is_refused_then_finetune_is_killed_mid_training(tmp_path):
    run = tmp_path / "run"
    args = [*FINETUNE[:-6], "--epochs", "150", "--batch-size", "200", "--quiet", "--json"]
    proc = subprocess.Popen([sys.executable, "-m", "dpsynth", *args, "--run", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:  # wait until DP-SGD is under way
            if (run / MANIFEST).exists() and yaml.safe_load((run / MANIFEST).read_text())["privacy"]["events"]:
                break
            time.sleep(0.05)
        # A second process on the same run directory is refused, naming the live holder.
        before = (run / MANIFEST).read_bytes()
        with pytest.raises(RunDirError, match=f"in use by process {proc.pid}"):
            with RunDir.open(run).lock():
                pass
        assert proc.poll() is None, "finetune finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    opened = check_consistent(run)
    assert opened.manifest["stages"]["finetune"]["status"] == "running"
    assert [e.stage for e in opened.events()] == ["finetune"]
    assert (run / MANIFEST).read_bytes() == before  # the refused process wrote nothing
    with pytest.raises(RunDirError, match=f"stale lock from process {proc.pid} .* remove {run / LOCK}"):
        with RunDir.open(run).lock():
            pass
