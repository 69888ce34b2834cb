"""DP-SGD step time over the non-private step time for the EDM U-Net, side by side in one run,
plus the generator's sampling throughput.

    PYTHONPATH=src python benchmarks/diffusion_step.py                    # CPU, small settings
    PYTHONPATH=src python benchmarks/diffusion_step.py --device cuda --batch 256 --multiplicity 8

Every DP row runs the full mechanism (per-example gradients of the K-draw mean, clipping,
Gaussian noise, Adam step) on the same batch; the non-private rows run the same forward
over the same B*K rows with one mean loss. Ratios are to the non-private step with the same K.
"""

from __future__ import annotations

import argparse
import time

import pandas as pd
import torch

from dpsynth.models.edm import EDMConfig, EDMDiffusion, count_parameters
from dpsynth.training.dpsgd import DPSGDPlan, train_dp
from dpsynth.training.options import FinetuneOptions


def loss_fn(model, x, y):
    return model(x, y)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_nonprivate(cfg: EDMConfig, x, y, k: int, steps: int, device) -> float:
    model = EDMDiffusion(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    xs, ys = x.repeat_interleave(k, 0).to(device), y.repeat_interleave(k, 0).to(device)

    def step():
        opt.zero_grad(set_to_none=True)
        model(xs, ys).mean().backward()
        opt.step()

    step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - start) / steps


def time_dp(cfg: EDMConfig, x, y, k: int, steps: int, mode: str, device, physical: int | None) -> float:
    """Time of one logical DP-SGD step: train_dp on a dataset where every Poisson batch is
    about the benchmark batch (q = 1/2 over 2B images), minus its set-up (one warm-up run)."""
    model = EDMDiffusion(cfg).to(device)
    images = torch.cat([x, x]).cpu()
    labels = torch.cat([y, y]).cpu()
    plan = DPSGDPlan(dataset_size=len(images), batch_size=len(x), epochs=steps // 2)
    kwargs = dict(plan=plan, noise_multiplier=1.0, opts=FinetuneOptions(clip=1e-3, lr=1e-4, grad_sample_mode=mode,
                                                                      noise_multiplicity=k,
                                                                      physical_batch_size=physical))
    warm = DPSGDPlan(dataset_size=len(images), batch_size=len(x), epochs=1)
    train_dp(model, images, labels, loss_fn, **{**kwargs, "plan": warm})
    model = EDMDiffusion(cfg).to(device)
    sync(device)
    start = time.perf_counter()
    train_dp(model, images, labels, loss_fn, **kwargs)
    sync(device)
    return (time.perf_counter() - start) / plan.steps


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
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--physical", type=int, default=None)
    parser.add_argument("--modes", default="bk,vmap,hooks,functorch,ghost")
    parser.add_argument("--sample-n", type=int, default=64)
    parser.add_argument("--sample-steps", type=int, default=18)
    parser.add_argument("--threads", type=int, default=None)
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
    rows = []
    base = {kk: time_nonprivate(cfg, x, y, kk, args.steps, device) for kk in sorted({1, k})}
    rows.append({"step": "non-private (Adam), K=1", "K": 1, "s_per_step": base[1], "ratio": base[1] / base[1]})
    if k != 1:
        rows.append({"step": f"non-private (Adam), K={k}", "K": k, "s_per_step": base[k], "ratio": 1.0})
    for mode in args.modes.split(","):
        kk = 1 if mode == "ghost" else k
        seconds = time_dp(cfg, x, y, kk, args.steps, mode, device, args.physical)
        rows.append({"step": f"DP-SGD {mode}, K={kk}", "K": kk, "s_per_step": seconds, "ratio": seconds / base[kk]})
    table = pd.DataFrame(rows)
    print(f"EDM U-Net width {args.width}, {params:,} parameters, {args.resolution}px x{args.channels}, "
          f"batch {args.batch}, device {device}, threads {torch.get_num_threads()}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    ips = time_sampling(cfg, args.sample_n, args.sample_steps, device)
    print(f"\ngeneration: {ips:.1f} images/s ({args.sample_steps} Heun steps = {2 * args.sample_steps - 1} "
          f"network evaluations per image, batch {args.sample_n})")


if __name__ == "__main__":
    main()
