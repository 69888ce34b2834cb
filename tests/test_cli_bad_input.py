"""Bad input, systematically: one line naming the value (a budget refusal adds its options as an
indented list), exit 2, no traceback, nothing on disk changed. The table runs the CLI's real
entry point (`dpsynth.cli.main.main`: the same argument parsing and error mapping as the
console script) in-process, because a subprocess costs ~6 s of imports per case; two cases at
the end confirm it through a real subprocess."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from cli_helpers import dpsynth, snapshot
from dpsynth.cli.main import main

# (args, expected substrings). {run} = a fresh path, {base} = a copy of a real completed run,
# {npz:NAME} = a bad .npz written by NPZ[NAME], {tmp} = the case's directory.
CASES = [
    # unknown names
    (["select-public", "--sensitive", "nosuchset", "--sigma", "1"], ["unknown dataset 'nosuchset'"]),
    (["finetune", "--eps", "1", "--sensitive", "fashionmnist", "--method", "nosuch"], ["unknown method 'nosuch'", "choose one of"]),
    (["evaluate", "--protocol", "best-of-test"], ["--protocol 'best-of-test'"]),
    (["finetune", "--eps", "1", "--method", "dp-cvae", "--grad-sample-mode", "magic"], ["--grad-sample-mode 'magic'", "choose one of"]),
    (["select-public", "--sensitive", "celeba", "--sigma", "1.2"], ["celeba"]),
    # privacy parameters
    (["finetune", "--eps", "0"], ["--eps 0.0", "> 0"]),
    (["finetune", "--eps", "-1"], ["--eps -1.0", "> 0"]),
    (["finetune", "--eps", "nan"], ["--eps nan", "> 0"]),
    (["finetune", "--eps", "inf"], ["--eps inf", "> 0"]),
    (["finetune", "--eps", "abc"], ["--eps abc is not allowed", "valid number"]),
    (["select-public", "--sensitive", "fashionmnist", "--sigma", "0"], ["--sigma 0.0", "> 0"]),
    (["select-public", "--sensitive", "fashionmnist", "--sigma", "-2"], ["--sigma -2.0", "> 0"]),
    (["select-public", "--sensitive", "fashionmnist"], ["exactly one of --sigma"]),
    (["select-public", "--sensitive", "fashionmnist", "--sigma", "1", "--delta", "1.5"], ["--delta 1.5", "(0, 1)"]),
    (["select-public", "--sensitive", "fashionmnist", "--sigma", "1", "--delta", "0"], ["--delta 0.0", "(0, 1)"]),
    (["finetune", "--eps", "1", "--sensitive", "digits", "--method", "dp-cvae", "--delta", "0.001"],
     ["--delta 0.001", "< 1/N", "N=1797"]),
    (["finetune", "--eps", "1", "--clip", "0", "--sensitive", "digits"], ["--clip 0.0", "> 0"]),
    (["finetune", "--eps", "1", "--secure"], ["--secure needs the torchcsprng package", "drop --secure"]),
    (["audit", "--eps", "0"], ["--eps 0.0", "> 0"]),
    (["audit", "--canaries", "5"], ["--canaries 5", ">= 10"]),
    # counts
    (["generate", "--n", "0"], ["--n 0", "> 0"]),
    (["generate", "--n", "-5"], ["--n -5", "> 0"]),
    (["select-public", "--sensitive", "fashionmnist", "--sigma", "1", "--top-k", "0"], ["--top-k 0", "> 0"]),
    (["finetune", "--eps", "1", "--method", "dp-cvae", "--epochs", "0"], ["--epochs 0", "> 0"]),
    (["finetune", "--eps", "1", "--method", "dp-cvae", "--batch-size", "0"], ["--batch-size 0", "> 0"]),
    (["finetune", "--eps", "1", "--sensitive", "digits", "--method", "dp-cvae", "--limit", "100",
      "--batch-size", "500"], ["--batch-size 500", "between 1 and the dataset size"]),
    (["finetune", "--eps", "1", "--sensitive", "digits", "--limit", "0"], ["--limit 0", ">= 1"]),
    (["finetune", "--eps", "1", "--sensitive", "digits", "--channels", "2"], ["--channels 2", "1 or 3"]),
    (["finetune", "--eps", "1", "--sensitive", "digits", "--resolution", "7"], ["--resolution 7", "multiple of 4"]),
    # missing, corrupt or malformed data files
    (["select-public", "--sensitive", "npz:/nonexistent/x.npz", "--sigma", "1"], ["/nonexistent/x.npz", "expected an .npz"]),
    (["finetune", "--eps", "1", "--method", "dp-cvae", "--sensitive", "npz:{npz:corrupt}"], ["corrupt.npz", "not a readable .npz"]),
    (["finetune", "--eps", "1", "--method", "dp-cvae", "--sensitive", "npz:{npz:truncated}"], ["truncated.npz", "not a readable .npz"]),
    (["finetune", "--eps", "1", "--method", "dp-cvae", "--sensitive", "npz:{npz:no_images}"], ["no_images.npz", "no 'images'"]),
    (["finetune", "--eps", "1", "--method", "dp-cvae", "--sensitive", "npz:{npz:shape5d}"], ["shape5d.npz", "(2, 3, 4, 5, 6)", "allowed"]),
    (["finetune", "--eps", "1", "--method", "dp-cvae", "--sensitive", "npz:{npz:no_channel}"], ["no_channel.npz", "(4, 5, 6, 7)", "channel axis"]),
    (["finetune", "--eps", "1", "--method", "dp-cvae", "--sensitive", "npz:{npz:int64}"], ["int64.npz", "dtype int64", "uint8"]),
    (["finetune", "--eps", "1", "--method", "dp-cvae", "--sensitive", "npz:{npz:float_range}"], ["float_range.npz", "[0, 1]"]),
    (["finetune", "--eps", "1", "--method", "dp-cvae", "--sensitive", "npz:{npz:negative_label}"], ["negative_label.npz", "label -1", "0..K-1"]),
    (["finetune", "--eps", "1", "--method", "dp-cvae", "--sensitive", "npz:{npz:label_count}"], ["label_count.npz", "3 labels for 4 images"]),
    (["finetune", "--eps", "1", "--method", "dp-cvae", "--sensitive", "npz:{npz:empty}"], ["empty.npz", "empty", "at least one image"]),
    (["finetune", "--eps", "1", "--method", "dp-cvae", "--sensitive", "camelyon"], ["label 5 out of range", "allowed 0..1"]),
    # run directories: missing, incompatible, corrupt, tampered, locked, over budget
    (["finetune", "--eps", "1"], ["does not exist"]),
    (["pretrain"], ["does not exist"]),
    (["generate", "--n", "10"], ["has no manifest.yaml"]),
    (["ledger"], ["has no manifest.yaml"]),
    (["generate", "--n", "10", "--run", "{base:schema99}"], ["schema_version 99", "schema_version 1 only"]),
    (["generate", "--n", "10", "--run", "{base:corrupt_yaml}"], ["corrupt (not valid YAML", "left untouched"]),
    (["generate", "--n", "10", "--run", "{base:bad_delta}"], ["'privacy.delta' = 2.0", "(0, 1)", "left untouched"]),
    (["ledger", "--run", "{base:unknown_event}"], ["mechanism 'mystery' is unknown", "known: gaussian"]),
    (["generate", "--n", "10", "--run", "{base:tampered}"], ["generator.pt changed since stage 'finetune'"]),
    (["generate", "--n", "10", "--run", "{base:truncated_artifact}"], ["generator.pt changed since stage 'finetune'"]),
    (["generate", "--n", "10", "--run", "{base:deleted_artifact}"], ["generator.pt is missing"]),
    (["generate", "--n", "10", "--run", "{base:stale_lock}"], ["stale lock from process", "remove", ".lock"]),
    (["generate", "--n", "10", "--run", "{base:live_lock}"], ["in use by process"]),
    (["finetune", "--eps", "0.5", "--batch-size", "200", "--run", "{base:ok}"],
     ["already spent", "target --eps 0.5", "\n  - in this run: finetune --eps ", "\n  - keep --eps 0.5: in a new --run"]),
    (["finetune", "--eps", "5", "--delta", "0.0001", "--run", "{base:ok}"], ["--delta 0.0001", "fixed per run"]),
    (["finetune", "--eps", "5", "--method", "pdp-cvae", "--run", "{base:ok}"], ["--method pdp-cvae", "'dp-cvae'"]),
    # unwritable output and a full disk
    (["finetune", "--eps", "1", "--sensitive", "digits", "--method", "dp-cvae", "--run", "/sys/dpsynth-test-run"],
     ["--run /sys/dpsynth-test-run is not writable"]),
    (["finetune", "--eps", "1", "--sensitive", "digits", "--method", "dp-cvae", "--run", "{tmp}/a-file/run"],
     ["a-file is a file, not a directory"]),
    (["generate", "--n", "10", "--run", "{base:full_disk_patched}"], ["cannot write", "manifest.yaml", "No space left on device (ENOSPC)"]),
]


def _npz(path: Path, **arrays) -> None:
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


NPZ = {
    "corrupt": lambda p: p.write_bytes(os.urandom(300)),
    "truncated": lambda p: (_npz(p, images=np.zeros((50, 8, 8), np.uint8), labels=np.zeros(50, np.int64)),
                            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])),
    "no_images": lambda p: _npz(p, pictures=np.zeros((4, 8, 8), np.uint8)),
    "shape5d": lambda p: _npz(p, images=np.zeros((2, 3, 4, 5, 6), np.uint8)),
    "no_channel": lambda p: _npz(p, images=np.zeros((4, 5, 6, 7), np.uint8)),
    "int64": lambda p: _npz(p, images=np.zeros((4, 8, 8), np.int64), labels=np.zeros(4, np.int64)),
    "float_range": lambda p: _npz(p, images=np.full((4, 8, 8), 3.0), labels=np.zeros(4, np.int64)),
    "negative_label": lambda p: _npz(p, images=np.zeros((4, 8, 8), np.uint8), labels=np.array([0, 1, -1, 0])),
    "label_count": lambda p: _npz(p, images=np.zeros((4, 8, 8), np.uint8), labels=np.array([0, 1, 0])),
    "empty": lambda p: _npz(p, images=np.zeros((0, 8, 8), np.uint8), labels=np.zeros(0, np.int64)),
}


def _edit_manifest(run: Path, edit) -> None:
    data = yaml.safe_load((run / "manifest.yaml").read_text())
    edit(data)
    (run / "manifest.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


BASE = {
    "ok": lambda run: None,
    "schema99": lambda run: _edit_manifest(run, lambda d: d.update(schema_version=99)),
    "corrupt_yaml": lambda run: (run / "manifest.yaml").write_text("privacy: [unclosed\n"),
    "bad_delta": lambda run: _edit_manifest(run, lambda d: d["privacy"].update(delta=2.0)),
    "unknown_event": lambda run: _edit_manifest(run, lambda d: d["privacy"]["events"].append(
        {"stage": "x", "mechanism": "mystery"})),
    "tampered": lambda run: open(run / "generator.pt", "ab").write(b"\0"),
    "truncated_artifact": lambda run: (run / "generator.pt").write_bytes((run / "generator.pt").read_bytes()[:100]),
    "deleted_artifact": lambda run: (run / "generator.pt").unlink(),
    "stale_lock": lambda run: (run / ".lock").write_text(f"{_dead_pid()}\n"),
    "live_lock": lambda run: (run / ".lock").write_text(f"{os.getpid()}\n"),
    "full_disk_patched": lambda run: None,
}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A real completed run (dp-cvae on 200 digits, eps 1, full batches): the starting point of run-directory cases."""
    run = tmp_path_factory.mktemp("base") / "run"
    code = main(["finetune", "--sensitive", "digits", "--limit", "200", "--public-size", "1797", "--method", "dp-cvae", "--eps", "1",
                 "--epochs", "2", "--batch-size", "200", "--run", str(run), "--quiet", "--json"])
    assert code == 0
    return run


def _expand(args: list[str], tmp: Path, base_run) -> list[str]:
    out = []
    for arg in args:
        if "{npz:" in arg:
            name = arg.split("{npz:")[1].rstrip("}")
            path = tmp / f"{name}.npz"
            NPZ[name](path)
            arg = arg.replace("{npz:" + name + "}", str(path))
        if arg.startswith("{base:"):
            name = arg[len("{base:"):-1]
            copy = tmp / "run"
            shutil.copytree(base_run(), copy)
            BASE[name](copy)
            arg = str(copy)
        out.append(arg.replace("{tmp}", str(tmp)))
    return out


@pytest.mark.parametrize("args,expected", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(tmp_path, monkeypatch, capsys, request, args, expected):
    monkeypatch.setenv("DPSYNTH_DATA", str(tmp_path / "data"))  # empty: named sets other than these are absent
    monkeypatch.setenv("DPSYNTH_QUIET", "1")  # progress lines (stderr is not a TTY here) are not the error's
    if not any(a.startswith("npz:") or a in ("celeba", "camelyon") for a in args):
        monkeypatch.delenv("DPSYNTH_DATA")
    (tmp_path / "a-file").write_text("not a directory")
    if "camelyon" in args:
        (tmp_path / "data" / "camelyon").mkdir(parents=True)
        _npz(tmp_path / "data" / "camelyon" / "train.npz", images=np.zeros((3, 8, 8, 3), np.uint8),
             labels=np.array([0, 1, 5]))
    argv = _expand(args, tmp_path, lambda: request.getfixturevalue("base_run"))
    if "--run" not in argv and argv[0] != "audit":
        argv += ["--run", str(tmp_path / "run")]
    if "{base:full_disk_patched}" in args:
        def enospc(fd):
            raise OSError(28, os.strerror(28))
        monkeypatch.setattr(os, "fsync", enospc)  # the disk fills up at the first write of the stage
    before = snapshot(tmp_path)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    # One line; a budget refusal adds its options as an indented list under it.
    lines = err.splitlines()
    assert err.startswith("error: ") and all(line.startswith("  - ") for line in lines[1:]), err
    assert len(lines) == 1 or "already spent" in lines[0], err
    assert "Traceback" not in err
    for fragment in expected:
        assert fragment in err, err
    assert snapshot(tmp_path) == before


def test_the_table_is_at_least_thirty_cases_across_all_stages():
    commands = {args[0] for args, _ in CASES}
    assert len(CASES) >= 30
    assert {"select-public", "pretrain", "finetune", "generate", "evaluate", "ledger", "audit"} <= commands


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="mounting a tmpfs needs root")
def test_a_really_full_disk_is_refused_and_leaves_nothing(tmp_path, capsys):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("tmpfs mount not permitted here")
    try:
        code = main(["finetune", "--sensitive", "digits", "--method", "dp-cvae", "--eps", "1", "--run",
                     str(mnt / "run")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert "No space left on device (ENOSPC)" in err and "manifest.yaml" in err
        assert list(mnt.iterdir()) == []  # no run directory, lock or temp file left behind
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_the_console_script_behaves_like_the_in_process_table(tmp_path):
    result = dpsynth("finetune", "--eps", "nan", "--run", str(tmp_path / "run"))
    assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "--eps nan" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_missing_celeba_says_where_the_files_go(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DPSYNTH_DATA", str(tmp_path / "root"))
    code = main(["select-public", "--sensitive", "celeba", "--sigma", "1.2", "--run", str(tmp_path / "r")])
    assert code == 2
    assert str(tmp_path / "root" / "celeba") in capsys.readouterr().err
