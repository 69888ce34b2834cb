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
from dpsynth.pipeline.rundir import LOCK, MANIFEST, RunDir

FAULT = Path(__file__).with_name("fault_inject.py")
# Full batches (q = 1) keep the accountant's calibration fast; Poisson sampling is not what is tested here.
FINETUNE = ["finetune", "--sensitive", "digits", "--limit", "200", "--public-size", "1797", "--method", "dp-cvae", "--eps", "1",
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


def test_pretrain_killed_while_writing_its_model_restarts_cleanly(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["pretrain", "--sensitive", "digits", "--limit", "200", "--public-size", "1797", "--method", "pdp-cvae", "--public", "digits",
            "--epochs", "1", "--batch-size", "1000", "--quiet"]
    killed(2, *args, "--run", str(run))  # fsync 1: manifest (stage begins), 2: pretrained.pt
    opened = check_consistent(run)
    assert opened.manifest["stages"]["pretrain"]["status"] == "running" and not opened.manifest["artifacts"]
    clear_stale_lock(run, capsys, args)
    assert main([*args, "--run", str(run)]) == 0
    assert check_consistent(run).stage_done("pretrain") and not list(run.glob(".*.tmp"))


@pytest.mark.parametrize("kill_at", [1, 2, 3, 6, 8])
def test_finetune_killed_mid_write_never_under_counts_and_resumes(tmp_path, capsys, kill_at):
    # fsyncs of a new finetune run: 1 manifest (stage begins), 2 manifest (privacy event),
    # 3 checkpoint of the last step, 4-5 manifest (its hash, pointer), 6 generator.pt,
    # 7 manifest (its hash), 8 manifest (stage completed), 9 manifest (checkpoint dropped).
    run = tmp_path / "run"
    killed(kill_at, *FINETUNE, "--run", str(run))
    opened = check_consistent(run)
    if kill_at == 1:
        assert opened is None  # the first manifest never appeared: only the lock and a temp file remain
        assert {p.name for p in run.iterdir()} - {LOCK} == {p.name for p in run.glob(".manifest.yaml.*.tmp")}
        return
    events = opened.events()
    epsilon = opened.manifest["privacy"]["epsilon"]
    if kill_at == 2:
        assert events == []  # killed before the event was durable, so no DP-SGD step had run
    else:
        assert [e.stage for e in events] == ["finetune"] and epsilon > 0  # DP-SGD ran: its event is on disk
    assert ("generator.pt" in opened.manifest["artifacts"]) == (kill_at == 8)
    clear_stale_lock(run, capsys, FINETUNE)
    if kill_at == 2:  # nothing was spent: --resume is refused, a plain rerun starts from scratch
        assert main([*FINETUNE, "--resume", "--run", str(run)]) == 2
        assert "never recorded its privacy event" in capsys.readouterr().err
        assert main([*FINETUNE, "--run", str(run)]) == 0
        assert check_consistent(run).stage_done("finetune")
        return
    assert main([*FINETUNE, "--resume", "--run", str(run)]) == 0
    done = check_consistent(run)
    assert done.stage_done("finetune") and done.events() == events  # no second event for the same steps
    assert done.manifest["privacy"]["epsilon"] == epsilon
    resumed_from = done.manifest["stages"]["finetune"]["resumed"][-1]["from_step"]
    assert resumed_from == (0 if kill_at == 3 else events[0].steps)  # final checkpoint: export, no retraining
    assert not list(run.glob("checkpoint-*")) and not any(n.startswith("checkpoint-") for n in done.manifest["artifacts"])


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dpsynth", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(run: Path, proc: subprocess.Popen, ready) -> dict:
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run / MANIFEST).exists():  # renamed into place whole: always parseable
            manifest = yaml.safe_load((run / MANIFEST).read_text())
            if ready(manifest):
                return manifest
        time.sleep(0.01)
    raise AssertionError(f"finetune ended (rc={proc.poll()}) before the test could interrupt it")


LONG = [*FINETUNE[:-6], "--epochs", "20", "--batch-size", "200", "--checkpoint-every", "5", "--quiet", "--json"]


def test_second_process_is_refused_then_finetune_is_killed_mid_training_and_resumes(tmp_path):
    run = tmp_path / "run"
    proc = _start([*LONG, "--run", str(run)])
    try:
        _wait_for(run, proc, lambda m: m["stages"]["finetune"].get("checkpoint"))
        proc.send_signal(signal.SIGSTOP)  # frozen mid-training: alive, holding the lock
        # A second process on the same run directory is refused, naming the live holder.
        with pytest.raises(RunDirError, match=f"in use by process {proc.pid}"):
            with RunDir.open(run).lock():
                pass
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    opened = check_consistent(run)
    entry = opened.manifest["stages"]["finetune"]
    assert entry["status"] == "running" and entry["checkpoint"]["step"] % 5 == 0
    events = opened.events()
    assert [e.stage for e in events] == ["finetune"]
    with pytest.raises(RunDirError, match=f"stale lock from process {proc.pid} .* remove {run / LOCK}"):
        with RunDir.open(run).lock():
            pass
    (run / LOCK).unlink()
    assert main([*LONG, "--resume", "--run", str(run)]) == 0
    done = check_consistent(run)
    assert done.stage_done("finetune") and done.events() == events
    assert done.manifest["stages"]["finetune"]["resumed"] == [
        {"time": done.manifest["stages"]["finetune"]["resumed"][0]["time"], "from_step": entry["checkpoint"]["step"]}]


def test_ctrl_c_stops_at_a_step_boundary_with_a_checkpoint_and_resume_checks_it(tmp_path, capsys):
    run = tmp_path / "run"
    proc = _start([*LONG, "--run", str(run)])
    try:
        _wait_for(run, proc, lambda m: m["privacy"]["events"])
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert stderr.startswith("interrupted: finetune stopped after step ") and "--resume" in stderr
    assert "Traceback" not in stderr
    opened = check_consistent(run)
    entry = opened.manifest["stages"]["finetune"]
    assert entry["status"] == "interrupted" and not (run / LOCK).exists()
    name = entry["checkpoint"]["name"]
    assert f"after step {entry['checkpoint']['step']} of" in stderr

    # Resume refuses: a contradicting flag, a tampered checkpoint, a checkpoint of another run.
    assert main([*LONG[:-4], "--lr", "0.5", "--quiet", "--resume", "--run", str(run)]) == 2
    assert "--lr 0.5 differs from the interrupted run's" in capsys.readouterr().err
    tampered = tmp_path / "tampered"
    shutil.copytree(run, tampered)
    with open(tampered / name, "ab") as fh:
        fh.write(b"\0")
    assert main([*LONG, "--resume", "--run", str(tampered)]) == 2
    assert f"{name} changed since stage 'finetune'" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    shutil.copytree(run, foreign)
    manifest = yaml.safe_load((foreign / MANIFEST).read_text())
    manifest["run_id"] = "another-run"
    (foreign / MANIFEST).write_text(yaml.safe_dump(manifest, sort_keys=False))
    assert main([*LONG, "--resume", "--run", str(foreign)]) == 2
    assert "belongs to another run or privacy event" in capsys.readouterr().err

    assert main([*LONG, "--resume", "--run", str(run)]) == 0
    done = check_consistent(run)
    assert done.stage_done("finetune") and len(done.events()) == 1
