"""EFSGD step time against the DP-SGD step, side by side in one run.

Same model (the pipeline's conditional VAE), same real Fashion-MNIST images, same Poisson
batches' expected size, same per-example gradients (each mode below); the only difference
is the private optimizer: opacus' DPOptimizer ("dpsgd") or EFSGDOptimizer ("efsgd": an
extra unclipped per-example sum, the clipped error feedback and the error state update).
Prints a table and EFSGD's ratio to DP-SGD for each grad-sample mode, then the optimizer step
alone (given per-example gradients already in `p.grad_sample`), where the two differ. Timings
alternate dpsgd/efsgd within each repeat so that load changes on a shared machine hit both.

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
from dpsynth.training.options import FinetuneOptions


def timed_pair(fns: dict, repeats: int) -> dict:
    """Median seconds of each callable, alternating them within every repeat."""
    for fn in fns.values():
        fn()  # warm-up: allocator, vmap tracing
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def optimizer_only(build, batch: int, repeats: int) -> dict:
    """One private optimizer step on the CVAE's parameters with random per-example gradients."""
    from dpsynth.training.private_optimizer import make_private_optimizer

    steps = {}
    for kind in ("dpsgd", "efsgd"):
        model = build()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = make_private_optimizer(kind, torch.optim.Adam(params, lr=1e-3), noise_multiplier=1.0, clip=1.0,
                                     expected_batch_size=batch, feedback_clip=0.01 if kind == "efsgd" else None)
        grads = [torch.randn(batch, *p.shape) for p in params]

        def step(opt=opt, params=params, grads=grads):
            opt.zero_grad(set_to_none=True)
            for p, g in zip(params, grads):
                p.grad_sample = g.view_as(g)  # a fresh tensor object: opacus marks used ones
            opt.step()
        steps[kind] = step
    return timed_pair(steps, repeats)


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
                                noise_multiplier=1.0, opts=FinetuneOptions(clip=1.0, lr=1e-3, grad_sample_mode=mode,
                                                                           private_optimizer=kind,
                                                                           feedback_clip=feedback))

    rows = []
    for mode in args.modes:
        seconds = timed_pair({kind: run(mode, kind) for kind in ("dpsgd", "efsgd")}, args.repeats)
        for kind in ("dpsgd", "efsgd"):
            rows.append({"what": f"train step ({mode})", "optimizer": kind,
                         "seconds_per_step": seconds[kind] / plan.steps,
                         "ratio_to_dpsgd": seconds[kind] / seconds["dpsgd"]})
    seconds = optimizer_only(build, args.batch, max(args.repeats, 5))
    for kind in ("dpsgd", "efsgd"):
        rows.append({"what": "optimizer step only", "optimizer": kind, "seconds_per_step": seconds[kind],
                     "ratio_to_dpsgd": seconds[kind] / seconds["dpsgd"]})
    table = pd.DataFrame(rows)
    print(f"conditional VAE, {params:,} parameters, expected Poisson batch {args.batch}, 28x28x1, "
          f"{plan.steps} steps per train call, medians, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    try:
        print(table.to_markdown(index=False, floatfmt=".3f"))
    except ImportError:
        print(table.to_string(index=False))


if __name__ == "__main__":
    main()
