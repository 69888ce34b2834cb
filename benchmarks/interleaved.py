"""Side-by-side timing on a shared machine: every candidate once per round, rounds repeated,
the median per candidate. Interleaving spreads a load change over all candidates alike, so
their RATIOS stay honest even when absolute times move (2 shared cores)."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved_medians(candidates: dict[str, Callable[[], object]], rounds: int,
                        sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """{name: median seconds of one call}; each candidate is called once first to warm up. A
    candidate may return the seconds it measured itself (a float: e.g. per step, between its
    first and last step, leaving out set-up); otherwise its whole call is timed."""
    for fn in candidates.values():
        fn()
    sync()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            start = time.perf_counter()
            measured = fn()
            sync()
            samples[name].append(measured if isinstance(measured, float) else time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


class StepClock:
    """A `progress` callback for the training loops: seconds per step between the first and the
    last step (so the set-up and the first, warm-up step are left out)."""

    def __init__(self, sync: Callable[[], None] = lambda: None):
        self.sync, self.times = sync, []

    def __call__(self, phase, step, total, loss) -> None:
        self.sync()
        self.times.append(time.perf_counter())

    def per_step(self) -> float:
        if len(self.times) < 2:
            raise ValueError("StepClock needs at least 2 steps")
        return (self.times[-1] - self.times[0]) / (len(self.times) - 1)
