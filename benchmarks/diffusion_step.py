"""DP-SGD step time over the non-private step time for the EDM U-Net, side by side in one run,
plus the generator's sampling throughput.

    PYTHONPATH=src python benchmarks/diffusion_step.py                    # CPU, small settings
    PYTHONPATH=src python benchmarks/diffusion_step.py --device cuda --batch 256 --multiplicity 8
    ... --json     # one object {"ratios": {mode: DP/non-DP at the same K}, "seconds_per_step": {...}, ...}

Every DP row runs the full mechanism (per-example gradients of the K-draw mean, clipping,
Gaussian noise, Adam step) on the same batch; the non-private rows run the same forward
over the same B*K rows with one mean loss. Ratios are to the non-private step with the same K.
"""

from __future__ import annotations

import argparse
import json
import time

import pandas as pd
import torch

from interleaved import StepClock, interleaved_medians
from dpsynth.models.edm import EDMConfig, EDMDiffusion, count_parameters
from dpsynth.training.dpsgd import DPSGDPlan, train_dp
from dpsynth.training.options import GRAD_SAMPLE_MODES, FinetuneOptions


def loss_fn(model, x, y):
    return model(x, y)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def nonprivate_step(cfg: EDMConfig, x, y, k: int, steps: int, device):
    """`steps` plain Adam steps on the same B*K rows with one mean loss, from a fresh model (as
    the DP calls start from one)."""
    xs, ys = x.repeat_interleave(k, 0).to(device), y.repeat_interleave(k, 0).to(device)

    def run() -> float:
        model, clock = EDMDiffusion(cfg).to(device), StepClock(lambda: sync(device))
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            model(xs, ys).mean().backward()
            opt.step()
            clock(None, step, None, None)
        return clock.per_step()
    return run


def dp_step(cfg: EDMConfig, x, y, k: int, steps: int, mode: str, device, physical: int | None):
    """train_dp from a fresh model on a dataset where every Poisson batch is about the benchmark
    batch (q = 1/2 over 2B images), `steps` logical steps (rounded up to even)."""
    images, labels = torch.cat([x, x]).cpu(), torch.cat([y, y]).cpu()
    plan = DPSGDPlan(dataset_size=len(images), batch_size=len(x), epochs=max(1, steps // 2))  # 2 steps/epoch
    opts = FinetuneOptions(clip=1e-3, lr=1e-4, grad_sample_mode=mode, noise_multiplicity=k,
                           physical_batch_size=physical)

    def run() -> float:
        clock = StepClock(lambda: sync(device))
        train_dp(EDMDiffusion(cfg).to(device), images, labels, loss_fn, plan=plan, noise_multiplier=1.0, opts=opts,
                 progress=clock)
        return clock.per_step()
    return run


def time_sampling(cfg: EDMConfig, n: int, steps: int, device) -> float:
    model = EDMDiffusion(cfg).to(device).eval()
    labels = torch.arange(n) % cfg.num_classes
    model.sample(labels[: min(n, 8)], steps=2)
    sync(device)
    start = time.perf_counter()
    model.sample(labels, steps=steps)
    sync(device)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--multiplicity", type=int, default=4)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=28)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4, help="steps per timed call (the first is warm-up)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument("--physical", type=int, default=None)
    parser.add_argument("--modes", default=",".join(GRAD_SAMPLE_MODES), help="comma-separated grad-sample modes "
                        "(ghost runs at K=1: opacus' ghost clipping cannot average K draws per example)")
    parser.add_argument("--sample-n", type=int, default=64)
    parser.add_argument("--sample-steps", type=int, default=18)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = EDMConfig(resolution=args.resolution, channels=args.channels, width=args.width)
    torch.manual_seed(0)
    x = torch.randint(0, 256, (args.batch, args.channels, args.resolution, args.resolution), dtype=torch.uint8)
    y = torch.randint(0, 10, (args.batch,))
    params = count_parameters(EDMDiffusion(cfg))
    k = args.multiplicity
    calls, label = {}, {}
    for kk in sorted({1, k}):
        calls[f"np{kk}"] = nonprivate_step(cfg, x, y, kk, args.steps, device)
        label[f"np{kk}"] = (f"non-private (Adam), K={kk}", kk, None)
    for mode in args.modes.split(","):
        kk = 1 if mode == "ghost" else k  # opacus' ghost clipping clips each row: K draws cannot be averaged
        calls[mode] = dp_step(cfg, x, y, kk, args.steps, mode, device, args.physical)
        label[mode] = (f"DP-SGD {mode}, K={kk}", kk, mode)
    seconds = interleaved_medians(calls, args.rounds)  # per step, first to last (set-up left out)
    rows = [{"step": label[n][0], "K": label[n][1], "s_per_step": s, "ratio": s / seconds[f"np{label[n][1]}"]}
            for n, s in seconds.items()]
    table = pd.DataFrame(rows)
    if args.json:
        print(json.dumps({"ratios": {label[n][2]: round(r["ratio"], 3) for n, r in zip(seconds, rows) if label[n][2]},
                          "seconds_per_step": {r["step"]: round(r["s_per_step"], 5) for r in rows},
                          "settings": {"model": "edm-unet", "width": args.width, "parameters": params,
                                       "resolution": args.resolution, "batch": args.batch, "multiplicity": k,
                                       "rounds": args.rounds, "device": str(device),
                                       "threads": torch.get_num_threads()}}))
        return
    print(f"EDM U-Net width {args.width}, {params:,} parameters, {args.resolution}px x{args.channels}, "
          f"batch {args.batch}, device {device}, threads {torch.get_num_threads()}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    ips = time_sampling(cfg, args.sample_n, args.sample_steps, device)
    print(f"\ngeneration: {ips:.1f} images/s ({args.sample_steps} Heun steps = {2 * args.sample_steps - 1} "
          f"network evaluations per image, batch {args.sample_n})")


if __name__ == "__main__":
    main()
