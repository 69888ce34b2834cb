"""Checkpoint and resume of DP-SGD: stopping after any step and resuming from the captured
state gives exactly the weights, optimizer state and EMA of an uninterrupted run; the
first Ctrl-C only sets a flag, the second interrupts."""

import os
import signal

import pytest
import torch
from torch import nn

from dpsynth.training.checkpoint import Checkpointing, stop_on_sigint
from dpsynth.training.dpsgd import DPSGDPlan, ExponentialMovingAverage, train_dp
from dpsynth.training.options import FinetuneOptions


class Stochastic(nn.Module):
    """Draws noise in its forward pass, as the VAE and diffusion losses do."""

    def __init__(self):
        super().__init__()
        self.hidden, self.out = nn.Linear(6, 8), nn.Linear(8, 1)

    def forward(self, x, y):
        h = torch.tanh(self.hidden(x + 0.1 * torch.randn_like(x)))
        return (self.out(h).squeeze(1) - y).pow(2)


def loss(model, x, y):
    return model(x, y)


class Stop(Exception):
    pass


def run(mode, plan, x, y, resume=None, stop_at=None):
    torch.manual_seed(0)
    model = Stochastic()
    ema = ExponentialMovingAverage(model, 0.9)
    captured = {}

    def on_step(step, snapshot):
        if step == stop_at:
            captured["state"] = snapshot()
            raise Stop

    if resume is None:
        torch.manual_seed(1234)  # the DP randomness: sampling, noise and the model's own
    try:
        trained = train_dp(model, x, y, loss, plan=plan, noise_multiplier=0.8,
                           opts=FinetuneOptions(clip=0.5, lr=0.05, grad_sample_mode=mode), ema=ema,
                           checkpoints=Checkpointing(resume=resume, on_step=on_step))
    except Stop:
        return None, None, captured["state"]
    return trained, ema, None


@pytest.mark.parametrize("mode,stop_at", [("hooks", 2), ("ghost", 4), ("vmap", 6)])
def test_resume_equals_an_uninterrupted_run(mode, stop_at):
    torch.manual_seed(7)
    x, y = torch.randn(60, 6), torch.randn(60)
    plan = DPSGDPlan(dataset_size=60, batch_size=20, epochs=3)  # 3 steps per epoch: steps 2, 4 are mid-epoch, 6 a boundary
    full, full_ema, _ = run(mode, plan, x, y)
    _, _, state = run(mode, plan, x, y, stop_at=stop_at)
    assert state["step"] == stop_at
    resumed, resumed_ema, _ = run(mode, plan, x, y, resume=state)
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    for key, value in full_ema.state_dict().items():
        assert torch.equal(value, resumed_ema.state_dict()[key]), key
    # Without the RNG state the continuation differs: the test would notice a missing restore.
    state["rng"]["cpu"] = torch.manual_seed(99).get_state()
    other, _, _ = run(mode, plan, x, y, resume=state)
    assert not torch.equal(other.out.weight, full.out.weight)


def test_first_sigint_sets_a_flag_second_interrupts_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGINT)
    with stop_on_sigint() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
