import os
import subprocess
import sys

import pytest
import yaml

from dpsynth.errors import IntegrityError, RunDirError
from dpsynth.privacy.accountant import compose_epsilon
from dpsynth.privacy.events import GaussianEvent
from dpsynth.pipeline.rundir import MANIFEST, RunDir, atomic_write_bytes


def new_run(tmp_path) -> RunDir:
    run = RunDir.create(tmp_path / "run", method="privimage-cvae",
                        sensitive={"name": "x", "size": 10, "fingerprint": "sha256:0"}, public=None,
                        delta=1e-5, settings={"sensitive": "x", "public": None})
    with run.lock():
        run.begin_stage("select-public", {}, inputs=[])
        run.write_artifact("select-public", "a.json", b"{}")
        run.end_stage("select-public")
    return run


def snapshot(path):
    return {p: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_atomic_write_leaves_no_temp_files(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_events_are_written_ahead_and_reloaded(tmp_path):
    run = new_run(tmp_path)
    event = GaussianEvent("select-public", 3.0)
    with run.lock():
        run.record_event(event, compose_epsilon([event], run.delta))
    reopened = RunDir.open(run.path)
    assert reopened.events() == [event]
    assert reopened.manifest["privacy"]["epsilon"] == pytest.approx(compose_epsilon([event], 1e-5).upper)


def test_second_process_is_refused_by_the_lock(tmp_path):
    run = new_run(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (run.path / ".lock").write_text(f"{holder.pid}\n")
        with pytest.raises(RunDirError, match=f"in use by process {holder.pid}"):
            with run.lock():
                pass
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(RunDirError, match="stale lock"):
        with run.lock():
            pass


def test_corrupt_manifest_is_refused_and_left_untouched(tmp_path):
    run = new_run(tmp_path)
    manifest = run.path / MANIFEST
    manifest.write_text("privacy: [unclosed")
    before = snapshot(run.path)
    with pytest.raises(RunDirError, match="corrupt"):
        RunDir.open(run.path)
    assert snapshot(run.path) == before


def test_manifest_from_another_schema_version_is_refused(tmp_path):
    run = new_run(tmp_path)
    data = yaml.safe_load((run.path / MANIFEST).read_text())
    data["schema_version"] = 99
    (run.path / MANIFEST).write_text(yaml.safe_dump(data))
    with pytest.raises(RunDirError, match="schema_version 99"):
        RunDir.open(run.path)


def test_manifest_with_an_unknown_privacy_event_is_refused(tmp_path):
    run = new_run(tmp_path)
    data = yaml.safe_load((run.path / MANIFEST).read_text())
    data["privacy"]["events"].append({"stage": "x", "mechanism": "mystery"})
    (run.path / MANIFEST).write_text(yaml.safe_dump(data))
    with pytest.raises(RunDirError, match="mystery"):
        RunDir.open(run.path)


def test_changed_artifact_is_refused_with_its_name(tmp_path):
    run = new_run(tmp_path)
    (run.path / "a.json").write_bytes(b'{"tampered": 1}')
    with pytest.raises(IntegrityError, match="a.json changed since stage 'select-public'"):
        RunDir.open(run.path).read_artifact("a.json")
    os.remove(run.path / "a.json")
    with pytest.raises(IntegrityError, match="missing"):
        RunDir.open(run.path).read_artifact("a.json")
