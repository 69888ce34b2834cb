"""What it takes to continue DP-SGD exactly where it stopped, and a Ctrl-C that waits
for the step to finish.

A training state holds the step count, the model and optimizer state, the EMA and the
global RNG state (which drives Poisson sampling, opacus' noise and the model's own
randomness). Restoring all of it makes a resumed run take the same steps an
uninterrupted one would have taken. The RNG state is as secret as the noise it generates:
checkpoints live only until the stage completes (see `stages/finetune_checkpoints.py`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

import torch
from torch import nn


def capture_state(step: int, model: nn.Module, optimizer: torch.optim.Optimizer, ema=None) -> dict:
    """A deep copy (on CPU) of everything needed to continue after `step` steps."""
    def cpu(tree):
        if isinstance(tree, torch.Tensor):
            return tree.detach().cpu().clone()
        if isinstance(tree, dict):
            return {k: cpu(v) for k, v in tree.items()}
        if isinstance(tree, (list, tuple)):
            return type(tree)(cpu(v) for v in tree)
        return tree

    return {
        "step": int(step),
        "model": cpu(model.state_dict()),
        "optimizer": cpu(optimizer.state_dict()),
        "ema": None if ema is None else {"shadow": cpu(ema.shadow), "updates": ema.updates},
        "rng": {"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
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
    """Last thing before the first resumed step: nothing may draw from the RNG after it."""
    torch.set_rng_state(state["rng"]["cpu"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])


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
