"""Workers for tests/test_distributed.py: real train_dp runs in W processes (gloo, CPU) joined
through `dpsynth.training.distributed.init_from_env`, as torchrun would join them.

Each run records, per logical step, the weights after the step and the example indices this
rank's Poisson shard held (the labels are the example indices; the loss reads its targets
from a table by index), and saves them to OUT/<name>-rank<r>.pt for the test to check.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import torch
from torch import nn


def spawn(world: int, out: Path, configs: list[dict]) -> None:
    """Run every config in `world` processes; raises if any process fails.

    The rendezvous store is hosted here, in the parent, as torchrun's agent hosts it: its port is
    bound from the moment it is chosen, so no other process can take it before the ranks meet.
    (It was once guessed to cure a rank's SIGABRT at exit; it did not: `distributed.shutdown` did.)"""
    import torch.multiprocessing as mp
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, None, True, datetime.timedelta(seconds=600), wait_for_workers=False)
    try:
        mp.start_processes(_entry, args=(world, store.port, str(out), configs), nprocs=world, start_method="spawn",
                           join=True)
    finally:
        del store


def _entry(rank: int, world: int, port: int, out: str, configs: list[dict]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), DPSYNTH_DIST_TIMEOUT="600",
                      TORCHELASTIC_USE_AGENT_STORE="True")  # every rank a client of the parent's store
    torch.set_num_threads(1)
    from dpsynth.training import distributed

    assert distributed.init_from_env("cpu") and distributed.world_size() == world
    with distributed.leaving_group_after():
        for config in configs:
            torch.save(run_config(config), Path(out) / f"{config['name']}-rank{rank}.pt")


class Probe(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.linear(x)


def make_data(config: dict):
    g = torch.Generator().manual_seed(config.get("data_seed", 0))
    n, d_in, d_out = config["n"], config["d_in"], config["d_out"]
    x = torch.randn(n, d_in, generator=g)
    targets = 3.0 * torch.randn(n, d_out, generator=g)  # large: clipping at `clip` is active
    return x, torch.arange(n), targets


def build(config: dict) -> nn.Module:
    torch.manual_seed(config.get("model_seed", 0))
    return Probe(config["d_in"], config["d_out"])


def per_sample_loss_for(config: dict, targets: torch.Tensor, seen: list | None = None):
    zero = config.get("zero_gradient", False)

    def loss(model, x, y):
        if seen is not None:
            seen[-1].extend(int(i) for i in y.tolist())
        out = model(x)
        if zero:  # the update is then the noise alone
            return 0.0 * out.sum(dim=1)
        return (out - targets[y]).pow(2).sum(dim=1)

    return loss


def run_config(config: dict) -> dict:
    """train_dp on the config; what each step did, as this rank saw it."""
    from dpsynth.training.checkpoint import Checkpointing
    from dpsynth.training.dpsgd import DPSGDPlan, train_dp
    from dpsynth.training.options import FinetuneOptions

    x, labels, targets = make_data(config)
    model = build(config)
    plan = DPSGDPlan(dataset_size=config["n"], batch_size=config["batch"], epochs=config["epochs"])
    seen: list[list[int]] = [[]]  # indices per step (this rank's shard); the last list fills up
    record = config["mode"] != "vmap"  # inside vmap the labels are batched tensors
    weights = [torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])]

    def on_step(step, _snapshot):
        weights.append(torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()]))
        seen.append([])

    from dpsynth.training import distributed

    torch.manual_seed(1000 + distributed.rank())  # each rank its own sampling, as a secret reseed gives
    opts = FinetuneOptions(clip=config["clip"], lr=config["lr"], grad_sample_mode=config["mode"],
                           private_optimizer=config.get("optimizer", "dpsgd"),
                           feedback_clip=config.get("feedback_clip"), base_optimizer="sgd",
                           physical_batch_size=config.get("physical_batch_size"))
    train_dp(model, x, labels, per_sample_loss_for(config, targets, seen if record else None), plan=plan,
             noise_multiplier=config["sigma"], opts=opts, checkpoints=Checkpointing(on_step=on_step))
    return {"weights": torch.stack(weights), "seen": seen[:-1] if record else None, "steps": plan.steps,
            "sample_rate": plan.sample_rate, "rank": distributed.rank(), "world": distributed.world_size()}
