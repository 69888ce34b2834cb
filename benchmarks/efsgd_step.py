"""EFSGD step time against the DP-SGD step, side by side in one run.

Same model (the pipeline's conditional VAE), same real Fashion-MNIST images, same Poisson
batches' expected size, same per-example gradients (each mode below); the only difference
is the private optimizer: opacus' DPOptimizer ("dpsgd") or EFSGDOptimizer ("efsgd": an
extra unclipped per-example sum, the clipped error feedback and the error state update).
Prints a table and EFSGD's ratio to DP-SGD for each grad-sample mode.

    python benchmarks/efsgd_step.py [--batch 256] [--steps 4] [--repeats 3] [--modes vmap hooks]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import pandas as pd
import torch

from dpsynth.data import load_dataset
from dpsynth.methods import get_method
from dpsynth.training.dpsgd import DPSGDPlan, train_dp


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, vmap tracing
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per timed call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["vmap", "hooks"])
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    data = load_dataset("fashionmnist", "train", limit=args.batch * args.steps, seed=0)
    method = get_method("dp-cvae")
    build = lambda: method.build_generator(28, 1, 10)  # noqa: E731
    params = sum(p.numel() for p in build().parameters())
    plan = DPSGDPlan(dataset_size=len(data), batch_size=args.batch, epochs=1)

    def run(mode: str, kind: str):
        feedback = 0.5 * plan.sample_rate if kind == "efsgd" else None
        return lambda: train_dp(build(), data.images, data.labels, method.per_sample_loss, plan=plan,
                                noise_multiplier=1.0, clip=1.0, lr=1e-3, grad_sample_mode=mode,
                                private_optimizer=kind, feedback_clip=feedback)

    rows = []
    for mode in args.modes:
        seconds = {kind: timed(run(mode, kind), args.repeats) / plan.steps for kind in ("dpsgd", "efsgd")}
        for kind, value in seconds.items():
            rows.append({"grad_sample_mode": mode, "optimizer": kind, "seconds_per_step": value,
                         "images_per_second": args.batch / value,
                         "ratio_to_dpsgd": value / seconds["dpsgd"]})
    table = pd.DataFrame(rows)
    print(f"conditional VAE, {params:,} parameters, expected Poisson batch {args.batch}, 28x28x1, "
          f"{plan.steps} steps per call, median of {args.repeats}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    try:
        print(table.to_markdown(index=False, floatfmt=".3f"))
    except ImportError:
        print(table.to_string(index=False))


if __name__ == "__main__":
    main()
