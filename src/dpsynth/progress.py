"""The one progress signature of the library (torch-free):

    progress(phase: str, done: int, total: int, loss: float | None = None) -> None

Training loops, stages and the CLI's bars all use it; the library never prints.
"""

from __future__ import annotations

from typing import Optional, Protocol


class Progress(Protocol):
    def __call__(self, phase: str, done: int, total: int, loss: Optional[float] = None) -> None: ...


def no_progress(phase: str, done: int, total: int, loss: Optional[float] = None) -> None:
    return None
