"""What it takes to continue private training exactly where it stopped, the one checkpoint
interface of every trainer, and a Ctrl-C that waits for the step to finish.

A training state holds the step count, the model and optimizer state, the EMA, the global
RNG state (which drives Poisson sampling, the noise and the model's own randomness) and a
trainer's own hidden state under "extra" (DP-GAN's discriminator, GS-WGAN's shard
assignment and discriminators, dp-kernel's random features). Restoring all of it makes a
resumed run take the same steps an uninterrupted one would have taken. The RNG state (and
GS-WGAN's shards) are as secret as the noise: checkpoints live only until the stage
completes (see `pipeline/checkpoints.py`).

Every trainer takes one `Checkpointing` object: `checkpoints.resume` is the state to
continue from (None: step 0), and `checkpoints(step, snapshot)` is called at every private
step boundary, `snapshot()` capturing that state.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import nn


@dataclass
class Checkpointing:
    """The checkpoint interface of every private trainer (module docstring)."""

    resume: Optional[dict] = None
    on_step: Optional[Callable[[int, Callable[[], dict]], None]] = None

    def __call__(self, step: int, snapshot: Callable[[], dict]) -> None:
        if self.on_step is not None:
            self.on_step(step, snapshot)


def cpu_copy(tree):
    """A detached CPU copy of a tree of tensors (dicts, lists, tuples)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu().clone()
    if isinstance(tree, dict):
        return {k: cpu_copy(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(cpu_copy(v) for v in tree)
    return tree


def capture_state(step: int, model: nn.Module, optimizer: torch.optim.Optimizer, ema=None, **extra) -> dict:
    """A deep copy (on CPU) of everything needed to continue after `step` steps; `extra`
    holds a trainer's own state (modules and optimizers by their state_dict)."""
    cpu = cpu_copy
    return {
        "step": int(step),
        "model": cpu(model.state_dict()),
        "optimizer": cpu(optimizer.state_dict()),
        "ema": None if ema is None else {"shadow": cpu(ema.shadow), "updates": ema.updates},
        "rng": {"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "extra": {k: cpu(v.state_dict() if hasattr(v, "state_dict") else v) for k, v in extra.items()},
    }


def restore_model_and_optimizer(state: dict, model: nn.Module, optimizer: torch.optim.Optimizer, ema=None) -> int:
    """Load the state into a freshly built model/optimizer (before opacus wraps them);
    returns the step to continue from."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if (ema is None) != (state["ema"] is None):
        raise ValueError("checkpoint and resumed run disagree on whether an EMA is kept")
    if ema is not None:
        device = next(iter(ema.shadow.values())).device if ema.shadow else torch.device("cpu")
        ema.shadow = {k: v.to(device) for k, v in state["ema"]["shadow"].items()}
        ema.updates = state["ema"]["updates"]
    return int(state["step"])


def restore_rng(state: dict) -> None:
    """Last thing before the first resumed step: nothing may draw from the RNG after it. A
    checkpoint of a multi-process run holds every rank's state ("rank_rng"); each takes its own."""
    from . import distributed

    rng = state["rng"]
    ranks = state.get("rank_rng")
    if ranks is not None or distributed.active():
        if ranks is None or len(ranks) != distributed.world_size():
            raise RuntimeError(f"checkpoint holds the RNG states of {1 if ranks is None else len(ranks)} "
                               f"process(es); this run has {distributed.world_size()}")
        rng = ranks[distributed.rank()]
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


class StopRequest:
    """Set by the first SIGINT; training checks it at each step boundary."""

    def __init__(self) -> None:
        self.requested = False


@contextlib.contextmanager
def stop_on_sigint() -> Iterator[StopRequest]:
    """First Ctrl-C: finish the current step, then stop cleanly (the caller checkpoints).
    Second Ctrl-C: KeyboardInterrupt at once (still safe: the ledger was written first)."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop  # signal handlers can only be installed from the main thread
        return

    def handler(signum, frame):
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)
