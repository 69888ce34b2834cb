"""Images/s of DP fine-tuning at a recipe's setting (its method, generator, batch, noise
multiplicity K, physical batch), on whatever device is present, in 1 process or several.

The processes run `train_dp` exactly as `torchrun -m dpsynth -- finetune` does (each rank its
shard of every Poisson batch, the clipped sums all-reduced, rank 0's noise broadcast; gloo on
the CPU, nccl with a GPU per rank, gloo when ranks share one). Images/s counts the expected
Poisson batch per logical step (N q), each image with its K noise draws; the time is rank 0's,
per step from the first to the last (set-up and the first step left out), best of `--repeats`.
The images are real ones of the recipe's sensitive set when it is on disk, else random ones
of its shape (the time does not depend on their content).

    python benchmarks/throughput.py --recipe recipes/dpdm/fashionmnist.yaml --steps 3   # published setting
    python benchmarks/throughput.py --recipe recipes/privimage-cvae/fashionmnist-small.yaml --processes 1,2 --cores 2 [--json]
    python benchmarks/throughput.py --recipe R --batch 256 --multiplicity 4     # a lighter variant

On this 2-core CPU the published diffusion settings (batch 4096, K = 32) take minutes per step;
--batch/--multiplicity/--width scale them down, and every override is printed with the result.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import warnings
from pathlib import Path

import torch
import torch.multiprocessing as mp
import yaml

from interleaved import StepClock
from dpsynth.pipeline.finetune import DEFAULT_METHOD


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setting(recipe: Path, overrides: dict) -> dict:
    """The finetune setting of a recipe, with the command line's overrides."""
    data = yaml.safe_load(recipe.read_text())
    section = {str(k).replace("-", "_"): v for k, v in (data.get("finetune") or {}).items()}
    arch = dict(section.get("arch") or (data.get("pretrain") or {}).get("arch") or {})
    if overrides.get("width") is not None:
        arch["width"] = overrides["width"]
    out = {"method": section.get("method") or (data.get("select-public") or {}).get("method") or DEFAULT_METHOD,
           "sensitive": section.get("sensitive") or (data.get("select-public") or {}).get("sensitive") or "fashionmnist",
           "arch": arch, "batch": section.get("batch_size"), "multiplicity": section.get("noise_multiplicity"),
           "physical_batch_size": section.get("physical_batch_size"), "clip": section.get("clip", 1.0),
           "mode": section.get("grad_sample_mode"), "resolution": section.get("resolution")}
    out.update({k: v for k, v in overrides.items() if v is not None and k != "width"})
    return out


def _images(cfg: dict, n: int):
    from dpsynth.data import load_dataset
    from dpsynth.errors import BadInput

    try:
        data = load_dataset(cfg["sensitive"], "train", limit=n, seed=0)
        return data.images, data.labels, data.num_classes, "real"
    except (BadInput, OSError):  # not on disk: its shape is all the timing needs
        res = cfg["resolution"] or 32
        channels = 1 if cfg["sensitive"] in ("fashionmnist", "mnist", "mnist5k") else 3
        return (torch.randint(0, 256, (n, channels, res, res), dtype=torch.uint8), torch.randint(0, 10, (n,)), 10,
                "random")


def _worker(rank: int, world: int, port: int, threads: int, cfg: dict, out: str) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    from dpsynth.methods import get_method
    from dpsynth.training import distributed
    from dpsynth.training.device import resolve_device
    from dpsynth.training.dpsgd import DPSGDPlan, train_dp
    from dpsynth.training.options import FinetuneOptions, resolve_options

    if world > 1:
        distributed.init_from_env(cfg["device"])
    device = torch.device("cuda", torch.cuda.current_device()) if (
        world > 1 and torch.cuda.is_available() and cfg["device"] in ("auto", "cuda")) else resolve_device(cfg["device"])
    method = get_method(cfg["method"], cfg["arch"])
    if method.own_mechanism:
        raise SystemExit(f"{cfg['method']} trains with its own mechanism, not DP-SGD: no DP-SGD throughput to measure")
    n = cfg["batch"] * 2  # q = 1/2: every logical step's Poisson batch is about `batch`
    images, labels, classes, kind = _images(cfg, n)
    opts = resolve_options(method, FinetuneOptions(
        clip=cfg["clip"], lr=1e-4, grad_sample_mode=cfg["mode"], noise_multiplicity=cfg["multiplicity"],
        physical_batch_size=cfg["physical_batch_size"]))
    plan = DPSGDPlan(dataset_size=n, batch_size=cfg["batch"], epochs=max(1, (cfg["steps"] + 1) // 2))
    trainable = [0]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run() -> float:
        torch.manual_seed(0)
        generator = method.prepare_private(method.build_generator(images.shape[-1], images.shape[1], classes), opts)
        trainable[0] = sum(p.numel() for p in generator.parameters() if p.requires_grad)
        clock = StepClock(sync)
        train_dp(generator.to(device), images, labels, method.per_sample_loss, plan=plan, noise_multiplier=1.0,
                 opts=opts, progress=clock)
        return clock.per_step()

    per_step = min(run() for _ in range(cfg["repeats"]))
    if rank == 0:
        k = opts.noise_multiplicity or 1
        Path(out).write_text(json.dumps({"seconds_per_step": per_step, "images_per_step": n * plan.sample_rate,
                                         "data": kind, "device": str(device), "mode": opts.grad_sample_mode,
                                         "multiplicity": k, "physical_batch_size": opts.physical_batch_size,
                                         "parameters": trainable[0]}))
    distributed.shutdown()


def measure(processes: int, cores: int, cfg: dict) -> dict:
    threads = max(1, cores // processes)
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        mp.start_processes(_worker, args=(processes, _free_port(), threads, cfg, out), nprocs=processes,
                           start_method="spawn", join=True)
        result = json.loads(Path(out).read_text())
    return {"processes": processes, "threads_each": threads, **result,
            "images_per_s": round(result["images_per_step"] / result["seconds_per_step"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=Path("recipes/privimage-cvae/fashionmnist-small.yaml"))
    parser.add_argument("--processes", default="1", help="comma-separated process counts, e.g. 1,2")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="CPU threads shared out among processes")
    parser.add_argument("--device", default="auto", help="auto (the GPU when present), cpu or cuda")
    parser.add_argument("--steps", type=int, default=4, help="logical steps per run (the first is warm-up)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--batch", type=int, default=None, help="override the recipe's expected batch")
    parser.add_argument("--multiplicity", type=int, default=None, help="override the recipe's K")
    parser.add_argument("--physical-batch-size", type=int, default=None)
    parser.add_argument("--mode", default=None, help="override the grad-sample mode")
    parser.add_argument("--width", type=int, default=None, help="override the generator's width")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ns = parser.parse_args()
    overrides = {"batch": ns.batch, "multiplicity": ns.multiplicity, "physical_batch_size": ns.physical_batch_size,
                 "mode": ns.mode, "width": ns.width}
    cfg = {**setting(ns.recipe, overrides), "steps": max(2, ns.steps), "repeats": ns.repeats, "device": ns.device}
    cfg["batch"] = cfg["batch"] or 512
    rows = [measure(int(p), ns.cores, cfg) for p in ns.processes.split(",")]
    for row in rows:
        row["ratio_to_first"] = round(row["images_per_s"] / rows[0]["images_per_s"], 3)
    given = {k: v for k, v in overrides.items() if v is not None}
    if ns.json:
        print(json.dumps({"rows": rows, "recipe": str(ns.recipe), "overrides": given, "setting": cfg}))
        return
    print(f"{ns.recipe}: {cfg['method']}, batch {cfg['batch']}, K {rows[0]['multiplicity']}, physical "
          f"{rows[0]['physical_batch_size']}, mode {rows[0]['mode']}, {rows[0]['parameters']:,} trainable parameters, "
          f"{rows[0]['device']}, {rows[0]['data']} images" + (f"; overrides {given}" if given else ""))
    print(f"{'processes':>9} {'threads':>7} {'s/step':>8} {'images/s':>9} {'ratio':>6}")
    for row in rows:
        print(f"{row['processes']:>9} {row['threads_each']:>7} {row['seconds_per_step']:>8.3f} "
              f"{row['images_per_s']:>9} {row['ratio_to_first']:>6}")


if __name__ == "__main__":
    main()
