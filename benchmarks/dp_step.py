"""DP-SGD step time against the same non-private step, side by side in one run.

Same model (the pipeline's conditional VAE), same batch of real Fashion-MNIST images,
same optimizer; the DP steps use opacus with per-sample clipping in each grad-sample
mode. Prints a table and each mode's ratio to the non-private step.

    python benchmarks/dp_step.py [--batch 512] [--repeats 5] [--width 16] [--hidden 128]
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
from dpsynth.training.dpsgd import DPSGDPlan, train_dp, train_nonprivate
from dpsynth.training.options import FinetuneOptions


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, opacus hooks
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per timed call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    data = load_dataset("fashionmnist", "train", limit=args.batch * args.steps, seed=0)
    options = {k: v for k, v in (("width", args.width), ("hidden", args.hidden)) if v is not None}
    method = get_method("dp-cvae", **options)
    build = lambda: method.build_generator(28, 1, 10)  # noqa: E731
    params = sum(p.numel() for p in build().parameters())
    n = len(data)
    plan = DPSGDPlan(dataset_size=n, batch_size=args.batch, epochs=1)

    def nonprivate():
        train_nonprivate(build(), data.images, data.labels, method.per_sample_loss, epochs=1,
                         batch_size=args.batch, lr=1e-3)

    def private(mode):
        return lambda: train_dp(build(), data.images, data.labels, method.per_sample_loss, plan=plan,
                                noise_multiplier=1.0, opts=FinetuneOptions(clip=1.0, lr=1e-3, grad_sample_mode=mode))

    rows = [{"step": "non-private (Adam)", "seconds_per_step": timed(nonprivate, args.repeats) / args.steps}]
    for mode in ("bk", "ghost", "hooks", "functorch"):
        rows.append({"step": f"DP-SGD opacus {mode}", "seconds_per_step": timed(private(mode), args.repeats) / plan.steps})
    table = pd.DataFrame(rows)
    base = table.loc[0, "seconds_per_step"]
    table["ratio_to_non_private"] = table["seconds_per_step"] / base
    table["images_per_second"] = args.batch / table["seconds_per_step"]
    print(f"conditional VAE, {params:,} parameters, batch {args.batch} (expected Poisson batch for DP), "
          f"28x28x1, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(table.to_markdown(index=False, floatfmt=".3f") if _has_tabulate() else table.to_string(index=False))


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
        return True
    except ImportError:
        return False


if __name__ == "__main__":
    main()
