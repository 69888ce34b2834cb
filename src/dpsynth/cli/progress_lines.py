"""Plain progress lines for a stderr that is not a terminal (a Makefile, a CI log, `2> file`).

Rich's bars need a terminal; without one a long stage would print nothing for minutes, and a
user cannot tell a hang from progress. `ProgressLines` takes the library's one progress
signature (`dpsynth.progress`) and writes one line

    [finetune] finetune (DP-SGD): 120/400 (30%), 2.1/s, ETA 2m13s, loss 0.0734

at least every `interval` seconds (a heartbeat thread repeats the last state when no step
came in that long) and one at the end of each phase. The interval is
$DPSYNTH_PROGRESS_INTERVAL (seconds, default 30); `--quiet` or $DPSYNTH_QUIET=1 silence it.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from ..errors import BadInput

DEFAULT_INTERVAL = 30.0
INTERVAL_ENV = "DPSYNTH_PROGRESS_INTERVAL"
QUIET_ENV = "DPSYNTH_QUIET"


def quiet_from_env() -> bool:
    return os.environ.get(QUIET_ENV, "").strip().lower() not in ("", "0", "false", "no")


def interval_from_env() -> float:
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return DEFAULT_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise BadInput(f"{INTERVAL_ENV}={raw!r} is not allowed; it must be a number of seconds > 0")
    return value


def duration(seconds: float) -> str:
    """2m13s, 1h04m, 45s."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


@dataclass
class _Phase:
    name: str
    started: float       # clock at the phase's first update
    start_done: int      # its count then (a resumed phase starts above 0)
    done: int
    total: int
    loss: Optional[float]
    updated: float
    ended: bool = False


class ProgressLines:
    """A progress callback that writes plain lines through `write` (one call per line)."""

    def __init__(self, stage: str, write: Callable[[str], None], *, interval: float = DEFAULT_INTERVAL,
                 clock: Callable[[], float] = time.monotonic):
        self.stage, self.write, self.interval, self.clock = stage, write, interval, clock
        self.phase: Optional[_Phase] = None
        self.began = self.last_line = clock()
        self._lock = threading.Lock()

    def __call__(self, phase: str, done: int, total: int, loss: Optional[float] = None) -> None:
        with self._lock:
            now = self.clock()
            current = self.phase
            if current is None or current.name != phase or current.ended or done < current.done:
                current = self.phase = _Phase(phase, now, done, done, total, loss, now)
            current.done, current.total, current.updated = done, total, now
            if loss is not None:
                current.loss = loss
            if total and done >= total:
                current.ended = True
                self._emit(current, now)
            elif now - self.last_line >= self.interval:
                self._emit(current, now)

    def heartbeat(self) -> None:
        """Say something when nothing was said for `interval` (a slow step, or work before the first)."""
        with self._lock:
            now = self.clock()
            if now - self.last_line < self.interval:
                return
            if self.phase is None or self.phase.ended:
                self.last_line = now
                self.write(f"[{self.stage}] working, {duration(now - self.began)} since start")
            else:
                self._emit(self.phase, now)

    def line(self, p: _Phase, now: float) -> str:
        share = f" ({100 * p.done / p.total:.0f}%)" if p.total else ""
        elapsed = p.updated - p.started
        rate = (p.done - p.start_done) / elapsed if elapsed > 0 else 0.0
        parts = [f"[{self.stage}] {p.name}: {p.done}/{p.total}{share}"]
        if rate > 0:
            parts.append(f"{rate:.3g}/s" if rate >= 1 else f"{1 / rate:.3g} s each")
        if p.ended:
            parts.append(f"took {duration(now - p.started)}")
        elif rate > 0 and p.total:
            # From the last update: a step that is taking long shows as an ETA that does not fall.
            parts.append(f"ETA {duration((p.total - p.done) / rate - (now - p.updated))}")
        else:
            parts.append("ETA ?")
        if p.loss is not None:
            parts.append(f"loss {p.loss:.4g}")
        return ", ".join(parts)

    def _emit(self, p: _Phase, now: float) -> None:
        self.last_line = now
        self.write(self.line(p, now))

    @contextlib.contextmanager
    def running(self) -> Iterator["ProgressLines"]:
        """The callback with its heartbeat thread (real clock only), stopped on exit."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(min(1.0, self.interval / 4)):
                self.heartbeat()

        thread = threading.Thread(target=beat, name="dpsynth-progress", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
