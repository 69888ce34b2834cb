"""Multi-process DP-SGD (training/distributed.py) runs exactly the accounted mechanism: 2 real
processes (gloo, CPU) running train_dp, then the CLI under torch's launcher.

- the noise of the summed update has the single-process std sigma*C/(N q) (not sqrt(2) times
  it: noise is added once per step, not once per rank), for opacus' optimizer with hooks and
  with ghost clipping, and for EFSGD;
- with sigma = 0 every step is exactly the single-process clipped-sum step on the union of the
  ranks' batches (replayed here in one process), empty local batches and physical chunks included;
- the ranks take the plan's number of steps, their Poisson shards are disjoint and the pooled
  inclusion rate is q;
- `finetune --nproc 2` writes one ledger event, with the epsilon of the one-process run;
- a rank killed mid-training leaves the ledger whole and the run resumable with `--resume`.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cli_helpers import dpsynth
from ddp_workers import build, make_data, per_sample_loss_for, run_config, spawn
from dpsynth.cli.main import main
from dpsynth.pipeline.rundir import LOCK, MANIFEST, RunDir
from dpsynth.privacy.plans import DPSGDPlan, applied_noise_std
from dpsynth.training.distributed import PoissonBatches

NOISE = dict(n=400, batch=100, epochs=2, d_in=20, d_out=500, sigma=1.3, clip=0.7, lr=1.0, zero_gradient=True)
NOISE_CONFIGS = [
    {**NOISE, "name": "noise-hooks", "mode": "hooks"},
    {**NOISE, "name": "noise-ghost", "mode": "ghost"},
    {**NOISE, "name": "noise-efsgd", "mode": "vmap", "optimizer": "efsgd", "feedback_clip": 0.05},
]
# q = 0.1 over 10 examples, 5 per rank: a rank's batch is empty at about 59% of the steps.
REPLAY = dict(n=10, batch=1, epochs=3, d_in=3, d_out=2, sigma=0.0, clip=0.5, lr=0.1)
REPLAY_CONFIGS = [
    {**REPLAY, "name": "replay-hooks", "mode": "hooks"},
    {**REPLAY, "name": "replay-ghost-chunks", "mode": "ghost", "physical_batch_size": 1},
    {**REPLAY, "name": "replay-efsgd", "mode": "hooks", "optimizer": "efsgd", "feedback_clip": 0.2},
]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Every config run once in 2 processes: {name: [rank 0's record, rank 1's]}."""
    out = tmp_path_factory.mktemp("ddp")
    configs = NOISE_CONFIGS + REPLAY_CONFIGS
    spawn(2, out, configs)
    return {c["name"]: [torch.load(out / f"{c['name']}-rank{r}.pt") for r in range(2)] for c in configs}


def expected_std(config: dict) -> float:
    plan = DPSGDPlan(dataset_size=config["n"], batch_size=config["batch"], epochs=config["epochs"])
    noise = (applied_noise_std(config["sigma"], config["clip"]) if config.get("optimizer") == "efsgd"
             else config["sigma"] * config["clip"])
    return noise / (plan.dataset_size * plan.sample_rate)  # the update with SGD, lr 1, zero gradients


def check_noise(weights: torch.Tensor, config: dict) -> None:
    """Each step's update is N(0, s^2) per coordinate: its mean square / s^2 is chi^2_P / P."""
    deltas = weights[1:] - weights[:-1]
    s = expected_std(config)
    per_step = deltas.pow(2).mean(dim=1) / s ** 2
    coords = deltas.shape[1]
    assert torch.all((per_step - 1).abs() < 6 * math.sqrt(2 / coords)), (config["name"], per_step)
    overall = float(per_step.mean())
    assert abs(overall - 1) < 5 * math.sqrt(2 / deltas.numel()), (config["name"], overall)


@pytest.mark.parametrize("config", NOISE_CONFIGS, ids=lambda c: c["name"])
def test_noise_of_the_summed_update_is_the_single_process_mechanisms(two_ranks, config):
    rank0, rank1 = two_ranks[config["name"]]
    assert rank0["world"] == rank1["world"] == 2
    assert torch.equal(rank0["weights"], rank1["weights"])  # every rank applied the one noisy update
    check_noise(rank0["weights"], config)
    if config["mode"] == "hooks":  # the same measurement of one process (this one)
        check_noise(run_config(config)["weights"], config)


def test_ranks_take_the_planned_steps_on_disjoint_shards_at_the_global_sample_rate(two_ranks):
    included = trials = 0
    for config in NOISE_CONFIGS + REPLAY_CONFIGS:
        plan = DPSGDPlan(dataset_size=config["n"], batch_size=config["batch"], epochs=config["epochs"])
        ranks = two_ranks[config["name"]]
        for record in ranks:
            assert record["steps"] == plan.steps and record["sample_rate"] == plan.sample_rate
            assert len(record["weights"]) == plan.steps + 1  # one update per planned step, on every rank
        if ranks[0]["seen"] is None:  # vmap: the loss sees batched tensors, not indices
            continue
        for step in range(plan.steps):
            shards = [record["seen"][step] for record in ranks]
            assert all(i % 2 == r for r, shard in enumerate(shards) for i in shard)  # rank r owns r, r+2, ...
            assert all(len(set(shard)) == len(shard) for shard in shards)
        if config in NOISE_CONFIGS:  # q = 0.25 with many trials; REPLAY's are too few for a rate
            included += sum(len(shard) for record in ranks for shard in record["seen"])
            trials += plan.steps * plan.dataset_size
    q = 0.25
    assert trials > 0 and abs(included / trials - q) < 5 * math.sqrt(q * (1 - q) / trials), included / trials


def replay(config: dict, batches: list[list[int]]) -> torch.Tensor:
    """One process: the same clipped-sum steps (opacus' optimizer or EFSGD, noise 0) on the given batches."""
    from dpsynth.training.dpsgd import PerExampleGradients
    from dpsynth.training.private_optimizer import make_private_optimizer

    x, labels, targets = make_data(config)
    model = build(config)
    plan = DPSGDPlan(dataset_size=config["n"], batch_size=config["batch"], epochs=config["epochs"])
    base = torch.optim.SGD(model.parameters(), lr=config["lr"])
    optimizer = make_private_optimizer(config.get("optimizer", "dpsgd"), base, noise_multiplier=0.0,
                                       clip=config["clip"], expected_batch_size=plan.dataset_size * plan.sample_rate,
                                       feedback_clip=config.get("feedback_clip"))
    per_example = PerExampleGradients(model, per_sample_loss_for(config, targets), "hooks")
    weights = [torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])]
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        if batch:
            per_example.compute(x[batch], labels[batch])
        else:
            for p in model.parameters():
                p.grad_sample = torch.zeros((0, *p.shape))
        optimizer.step()
        weights.append(torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()]))
    return torch.stack(weights)


@pytest.mark.parametrize("config", REPLAY_CONFIGS, ids=lambda c: c["name"])
def test_without_noise_each_step_is_the_single_process_step_on_the_union_batch(two_ranks, config):
    rank0, rank1 = two_ranks[config["name"]]
    assert torch.equal(rank0["weights"], rank1["weights"])
    union = [sorted(set(a) | set(b)) for a, b in zip(rank0["seen"], rank1["seen"])]
    # the awkward cases happened: one rank's batch empty while the other's was not
    assert any(bool(a) != bool(b) for a, b in zip(rank0["seen"], rank1["seen"]))
    expected = replay(config, union)
    assert not torch.equal(expected[0], expected[-1])  # the steps did something
    torch.testing.assert_close(rank0["weights"], expected, atol=1e-5, rtol=1e-5)


def test_sharded_sampler_partitions_the_examples_and_yields_every_step():
    x, y = torch.randn(11, 2), torch.arange(11)
    shards = [PoissonBatches(x, y, sample_rate=1.0, rank=r, world_size=3, steps=4) for r in range(3)]
    assert sorted(i for s in shards for i in s.shard.tolist()) == list(range(11))
    assert all(len(list(iter(s))) == 4 for s in shards)
    assert sorted(i for s in shards for i in next(iter(s))[1].tolist()) == list(range(11))  # q = 1: all
    never = PoissonBatches(x, y, sample_rate=1e-12, rank=1, world_size=3, steps=5)
    assert [len(b) for b, _ in never] == [0] * 5  # empty local batches are still steps


# ---- the CLI ----------------------------------------------------------------------------------------
TINY = ["finetune", "--sensitive", "digits", "--limit", "200", "--public-size", "1797", "--method", "dp-cvae",
        "--eps", "4", "--epochs", "2", "--batch-size", "50", "--arch", "width=4,hidden=16,latent_dim=4",
        "--quiet", "--json"]


def _manifest(run: Path) -> dict:
    return yaml.safe_load((run / MANIFEST).read_text())


def _accounting(events: list) -> list[dict]:
    return [{k: v for k, v in e.to_dict().items() if k != "note"} for e in events]


def test_finetune_in_two_processes_writes_one_event_with_the_one_process_epsilon(tmp_path, capsys):
    two, one = tmp_path / "two", tmp_path / "one"
    done = dpsynth(*TINY, "--optimizer", "efsgd", "--grad-sample-mode", "hooks", "--nproc", "2", "--run", str(two),
                   env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert main([*TINY, "--optimizer", "efsgd", "--grad-sample-mode", "hooks", "--run", str(one)]) == 0
    capsys.readouterr()
    a, b = RunDir.open(two), RunDir.open(one)
    assert _accounting(a.events()) == _accounting(b.events())  # EFSGD's two events, once
    assert [e.mechanism for e in a.events()] == ["gaussian", "poisson_gaussian"]
    assert a.manifest["privacy"]["epsilon"] == b.manifest["privacy"]["epsilon"]
    entry = a.manifest["stages"]["finetune"]
    assert entry["status"] == "completed" and entry["config"]["processes"] == 2
    assert "generator.pt" in a.manifest["artifacts"] and not list(two.glob("checkpoint-*"))
    assert done.stdout.count("epsilon_spent") == 1  # rank 0 reports, once


def test_nproc_refuses_bad_values_in_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    for args, says in [(["--nproc", "0"], "--nproc 0"), (["--nproc", "2", "--method", "dp-kernel"], "own mechanism")]:
        code = main([*TINY[:7], "--eps", "1", *args, "--run", str(run)])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and says in err, err
    assert not run.exists()


KILL = Path(__file__).with_name("kill_rank.py")


def test_a_killed_rank_leaves_the_ledger_whole_and_resume_finishes(tmp_path, capsys):
    run = tmp_path / "run"
    args = [*TINY, "--epochs", "3", "--checkpoint-every", "1", "--run", str(run)]
    # torchrun itself, with the `--` that keeps its parser off finetune's --run; rank 1 SIGKILLs
    # itself at its 4th step boundary (after the 3rd step).
    killed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(KILL), "--", "1", "4", *args], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "DPSYNTH_DIST_TIMEOUT": "60"})
    assert killed.returncode != 0, killed.stderr[-3000:]
    assert "killing rank 1" in killed.stderr, killed.stderr[-3000:]
    before = RunDir.open(run)
    events = before.events()
    entry = before.manifest["stages"]["finetune"]
    assert [e.mechanism for e in events] == ["poisson_gaussian"]  # written before the first step, once
    assert entry["status"] in ("running", "failed") and 1 <= entry["checkpoint"]["step"] <= 3
    epsilon = before.manifest["privacy"]["epsilon"]
    lock = run / LOCK
    if lock.exists():  # rank 0 was terminated while it held the run's lock: stale now
        lock.unlink()
    # one process cannot continue two ranks' sampling states
    assert main([*args, "--resume"]) == 2 and "resume with --nproc 2" in capsys.readouterr().err
    resumed = dpsynth(*args, "--resume", "--nproc", "2", env={"OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    done = RunDir.open(run)
    assert done.stage_done("finetune") and _accounting(done.events()) == _accounting(events)
    assert done.manifest["privacy"]["epsilon"] == epsilon
    assert [r["from_step"] for r in done.manifest["stages"]["finetune"]["resumed"]] == [entry["checkpoint"]["step"]]
    assert "generator.pt" in done.manifest["artifacts"] and not list(run.glob("checkpoint-*"))
