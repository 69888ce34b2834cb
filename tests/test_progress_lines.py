"""Progress in any terminal: when stderr is not a TTY, plain lines (stage, step/total, rate, ETA,
loss) at least every interval and at the end of each phase; `--quiet` silences them."""

import re
import subprocess
import sys
import time

import pytest

from dpsynth.cli.common import progress_bars
from dpsynth.cli.main import main
from dpsynth.cli.progress_lines import ProgressLines, interval_from_env
from dpsynth.errors import BadInput
from dpsynth.progress import no_progress

LINE = re.compile(r"^\[(?P<stage>[\w-]+)\] (?P<phase>.+): (?P<done>\d+)/(?P<total>\d+) \(\d+%\)"
                  r"(?:, (?P<rate>[\d.]+/s|[\d.]+ s each))?, (?:ETA (?P<eta>\S+)|took (?P<took>\S+))"
                  r"(?:, loss (?P<loss>\S+))?$")
TINY = ["--sensitive", "digits", "--limit", "200", "--public-size", "1797", "--method", "dp-cvae", "--eps", "1",
        "--epochs", "2", "--batch-size", "50"]


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_a_line_every_interval_and_one_at_the_end_of_each_phase():
    clock, out = Clock(), []
    lines = ProgressLines("finetune", out.append, interval=30, clock=clock)
    for step in range(1, 101):  # one step a second
        clock.t = step
        lines("finetune (DP-SGD)", step, 100, loss=1.0 / step)
    clock.t = 101
    lines("generate", 64, 128)
    lines("generate", 128, 128)
    parsed = [LINE.match(line) for line in out]
    assert all(parsed), out
    assert [int(m["done"]) for m in parsed] == [30, 60, 90, 100, 128]  # 30 s apart, then each phase's end
    first = parsed[0]
    assert first["stage"] == "finetune" and first["phase"] == "finetune (DP-SGD)" and first["total"] == "100"
    assert first["rate"] == "1/s" and first["eta"] == "1m10s" and float(first["loss"]) == pytest.approx(1 / 30, rel=1e-3)
    assert parsed[3]["took"] == "1m39s" and parsed[3]["eta"] is None  # the phase's end says how long it took
    assert parsed[4]["phase"] == "generate" and parsed[4]["took"] == "0s"


def test_the_heartbeat_speaks_when_a_step_or_the_set_up_takes_longer_than_the_interval():
    clock, out = Clock(), []
    lines = ProgressLines("evaluate", out.append, interval=30, clock=clock)
    clock.t = 31
    lines.heartbeat()  # no step yet: still says it is alive
    assert out == ["[evaluate] working, 31s since start"]
    clock.t = 40
    lines("train cnn", 1, 10)
    clock.t = 50
    lines("train cnn", 2, 10)
    lines.heartbeat()  # 19 s since the last line: nothing
    assert len(out) == 1
    clock.t = 61  # a slow step: no update, but the interval has passed
    lines.heartbeat()
    m = LINE.match(out[-1])
    assert m and m["done"] == "2" and m["rate"] == "10 s each" and m["eta"] == "1m09s"  # 8 steps × 10 s - 11 s
    clock.t = 70
    lines.heartbeat()
    assert len(out) == 2


def test_interval_and_quiet_come_from_the_environment(monkeypatch):
    monkeypatch.delenv("DPSYNTH_PROGRESS_INTERVAL", raising=False)
    assert interval_from_env() == 30.0
    monkeypatch.setenv("DPSYNTH_PROGRESS_INTERVAL", "0.25")
    assert interval_from_env() == 0.25
    for bad in ("0", "-1", "abc", "nan"):
        monkeypatch.setenv("DPSYNTH_PROGRESS_INTERVAL", bad)
        with pytest.raises(BadInput, match="DPSYNTH_PROGRESS_INTERVAL"):
            interval_from_env()
    monkeypatch.setenv("DPSYNTH_PROGRESS_INTERVAL", "0.25")
    with progress_bars(False, "finetune") as progress:  # pytest's stderr is not a terminal
        assert isinstance(progress, ProgressLines) and progress.interval == 0.25
    monkeypatch.setenv("DPSYNTH_QUIET", "1")
    with progress_bars(False, "finetune") as progress:
        assert progress is no_progress


def test_a_real_non_tty_run_prints_lines_at_the_interval_and_quiet_prints_none(tmp_path, capsys):
    interval = 0.5
    child = subprocess.Popen([sys.executable, "-m", "dpsynth", "finetune", *TINY, "--run", str(tmp_path / "a")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={**__import__("os").environ, "DPSYNTH_PROGRESS_INTERVAL": str(interval)})
    arrivals = []
    for line in child.stderr:  # a pipe: not a TTY
        arrivals.append((time.monotonic(), line.rstrip("\n")))
    assert child.wait(timeout=600) == 0, arrivals[-5:]
    progress = [(t, line) for t, line in arrivals if line.startswith("[finetune] ")]
    steps = [LINE.match(line) for _, line in progress if LINE.match(line)]
    assert steps and steps[-1]["phase"] == "finetune (DP-SGD)" and steps[-1]["done"] == steps[-1]["total"] == "8"
    assert steps[-1]["took"] and steps[-1]["rate"] and steps[-1]["loss"]
    assert all(LINE.match(line) or line.startswith("[finetune] working, ") for _, line in progress)
    gaps = [b - a for (a, _), (b, _) in zip(progress, progress[1:])]
    assert len(progress) >= 3 and max(gaps) < interval + 2.0, gaps  # slack for a loaded 2-core machine

    # The same command prints its phase's end line without --quiet (capsys: not a TTY), none with it.
    capsys.readouterr()
    assert main(["generate", "--n", "64", "--run", str(tmp_path / "a")]) == 0
    assert any((m := LINE.match(line)) and m["phase"] == "generate" and m["took"]
               for line in capsys.readouterr().err.splitlines())
    assert main(["generate", "--n", "64", "--run", str(tmp_path / "a"), "--quiet"]) == 0
    assert "[generate]" not in capsys.readouterr().err
