"""DP-SGD step time against the same non-private step, side by side in one run.

Same model (the pipeline's conditional VAE), same real Fashion-MNIST images, same Adam; the
DP steps run `train_dp` (Poisson sampling, per-example clipping, Gaussian noise) in each
grad-sample mode, the non-private step plain minibatches of the same size from the same
in-memory tensors. Every candidate is timed once per round, rounds interleaved
(`interleaved.py`), so the ratios hold on a loaded machine. Prints a table and each mode's
ratio to the non-private step.

    python benchmarks/dp_step.py [--batch 512] [--rounds 5] [--width 16] [--hidden 128] [--modes bk,ghost]
        [--json]      # one object {"ratios": {mode: DP/non-DP}, "seconds_per_step": {...}, "settings": {...}}
"""

from __future__ import annotations

import argparse
import json
import warnings

import pandas as pd
import torch

from interleaved import StepClock, interleaved_medians
from dpsynth.data import load_dataset
from dpsynth.methods import get_method
from dpsynth.training.dpsgd import DPSGDPlan, train_dp
from dpsynth.training.options import GRAD_SAMPLE_MODES, FinetuneOptions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed call (the first is warm-up)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--modes", default=",".join(GRAD_SAMPLE_MODES), help="comma-separated grad-sample modes")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    data = load_dataset("fashionmnist", "train", limit=args.batch * args.steps, seed=0)
    options = {k: v for k, v in (("width", args.width), ("hidden", args.hidden)) if v is not None}
    method = get_method("dp-cvae", **options)
    build = lambda: method.build_generator(28, 1, 10)  # noqa: E731
    params = sum(p.numel() for p in build().parameters())
    plan = DPSGDPlan(dataset_size=len(data), batch_size=args.batch, epochs=1)

    def nonprivate() -> float:
        model, clock = build(), StepClock()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        for step, idx in enumerate(torch.randperm(len(data)).split(args.batch)):
            optimizer.zero_grad(set_to_none=True)
            method.per_sample_loss(model, data.images[idx], data.labels[idx]).mean().backward()
            optimizer.step()
            clock(None, step, None, None)
        return clock.per_step()

    def private(mode):
        def run() -> float:
            clock = StepClock()
            train_dp(build(), data.images, data.labels, method.per_sample_loss, plan=plan, noise_multiplier=1.0,
                     opts=FinetuneOptions(clip=1.0, lr=1e-3, grad_sample_mode=mode), progress=clock)
            return clock.per_step()
        return run

    modes = args.modes.split(",")
    calls = {"non-private": nonprivate, **{mode: private(mode) for mode in modes}}
    seconds = interleaved_medians(calls, args.rounds)  # per step, first to last (set-up left out)
    base = seconds["non-private"]
    ratios = {mode: seconds[mode] / base for mode in modes}
    if args.json:
        print(json.dumps({"ratios": {m: round(r, 3) for m, r in ratios.items()},
                          "seconds_per_step": {m: round(s, 5) for m, s in seconds.items()},
                          "settings": {"model": "dp-cvae", "parameters": params, "batch": args.batch,
                                       "rounds": args.rounds, "threads": torch.get_num_threads(),
                                       "torch": torch.__version__}}))
        return
    table = pd.DataFrame([{"step": "non-private (Adam)" if name == "non-private" else f"DP-SGD {name}",
                           "seconds_per_step": s, "ratio_to_non_private": s / base,
                           "images_per_second": args.batch / s} for name, s in seconds.items()])
    print(f"conditional VAE, {params:,} parameters, batch {args.batch} (expected Poisson batch for DP), "
          f"28x28x1, torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.rounds} "
          f"interleaved rounds")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
