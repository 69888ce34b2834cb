"""Images/s of DP fine-tuning in 1 process against several (torch.distributed, gloo on CPU),
the cores shared out: e.g. 1 process x 2 threads against 2 processes x 1 thread.

Same model (the pipeline's conditional VAE), same real images, same plan (N, batch, steps):
the processes run `train_dp` exactly as `torchrun -m dpsynth -- finetune` does (each rank its
shard of every Poisson batch, the clipped sums all-reduced, rank 0's noise broadcast). The time
is rank 0's, from a barrier before training to the end of the last step; a warm-up run first.

    python benchmarks/ddp_throughput.py [--processes 1,2] [--cores 2] [--batch 256] [--steps 8]
        [--mode ghost] [--width 16] [--hidden 128] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, threads: int, args: dict, out: str) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    from dpsynth.data import load_dataset
    from dpsynth.methods import get_method
    from dpsynth.training import distributed
    from dpsynth.training.dpsgd import DPSGDPlan, train_dp
    from dpsynth.training.options import FinetuneOptions

    if world > 1:
        distributed.init_from_env("cpu")
    n = args["batch"] * args["steps"]
    data = load_dataset(args["dataset"], "train", limit=n, seed=0)
    arch = {k: args[k] for k in ("width", "hidden") if args[k] is not None}
    method = get_method("dp-cvae", arch)
    plan = DPSGDPlan(dataset_size=len(data), batch_size=args["batch"], epochs=1)
    opts = FinetuneOptions(clip=1.0, lr=1e-3, grad_sample_mode=args["mode"],
                           physical_batch_size=args["physical_batch_size"])
    torch.manual_seed(1000 + rank)

    def run() -> float:
        torch.manual_seed(0)
        model = method.build_generator(data.images.shape[-1], data.images.shape[1], data.num_classes)
        distributed.barrier()
        start = time.perf_counter()
        train_dp(model, data.images, data.labels, method.per_sample_loss, plan=plan, noise_multiplier=1.0, opts=opts)
        distributed.barrier()
        return time.perf_counter() - start

    run()  # warm-up: allocator, opacus hooks, gloo connections
    seconds = min(run() for _ in range(args["repeats"]))
    if rank == 0:
        images = plan.steps * plan.dataset_size * plan.sample_rate  # expected images processed
        Path(out).write_text(json.dumps({"seconds": seconds, "images": images}))
    distributed.shutdown()


def measure(processes: int, cores: int, args: dict) -> dict:
    threads = max(1, cores // processes)
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        mp.start_processes(_worker, args=(processes, _free_port(), threads, args, out), nprocs=processes,
                           start_method="spawn", join=True)
        result = json.loads(Path(out).read_text())
    return {"processes": processes, "threads_each": threads, "seconds": round(result["seconds"], 3),
            "images_per_s": round(result["images"] / result["seconds"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="threads shared out among processes")
    parser.add_argument("--batch", type=int, default=256, help="expected (Poisson) logical batch")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--mode", default="ghost", help="grad_sample_mode")
    parser.add_argument("--physical-batch-size", type=int, default=None)
    parser.add_argument("--dataset", default="fashionmnist")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    ns = parser.parse_args()
    args = {"batch": ns.batch, "steps": ns.steps, "repeats": ns.repeats, "mode": ns.mode,
            "physical_batch_size": ns.physical_batch_size, "dataset": ns.dataset, "width": ns.width,
            "hidden": ns.hidden}
    rows = [measure(int(p), ns.cores, args) for p in ns.processes.split(",")]
    base = rows[0]["images_per_s"]
    for row in rows:
        row["ratio"] = round(row["images_per_s"] / base, 3)
    if ns.json:
        print(json.dumps({"rows": rows, "settings": args}))
        return
    print(f"{'processes':>9} {'threads':>7} {'seconds':>8} {'images/s':>9} {'ratio':>6}")
    for row in rows:
        print(f"{row['processes']:>9} {row['threads_each']:>7} {row['seconds']:>8} {row['images_per_s']:>9} "
              f"{row['ratio']:>6}")


if __name__ == "__main__":
    main()
