"""Stage `generate`: labelled synthetic images from the DP generator (post-processing: no cost)."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.utils import save_image

from ..errors import BadInput
from ..methods import get_method
from ..training.device import resolve_device
from ..validation import check_positive
from .common import Progress, no_progress, torch_load_bytes
from .lifecycle import stage_run
from .names import FINETUNE as FINETUNE_STAGE, GENERATE as STAGE, GENERATOR, GRID, SYNTHETIC
from .rundir import RunDir, now



def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    """n labels, as equal per class as n allows (DPImageBench generates class-balanced sets)."""
    return torch.arange(n) % num_classes


def run_generate(run_path: str | Path, *, n: int = 10000, seed: int = 0, batch_size: int = 1000,
                 steps: int | None = None, guidance: float | None = None, device: str | None = None,
                 use_ema: bool = True, progress: Progress = no_progress) -> dict:
    check_positive("n", n, integer=True)
    check_positive("batch_size", batch_size, integer=True)
    run = RunDir.open(run_path)
    method = get_method(run.manifest["method"])
    options = {"steps": steps, "guidance": guidance}
    options = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(options) - set(method.sample_defaults))
    if unknown:
        raise BadInput(f"method {method.name!r} has no sampler setting `{unknown[0]}`; "
                       f"its settings: {', '.join(f'`{k}`' for k in method.sample_defaults) or 'none'}")
    options = {**method.sample_defaults, **options}
    if "steps" in options:
        check_positive("steps", options["steps"], integer=True)
    if "guidance" in options:
        check_positive("guidance", options["guidance"], zero_ok=True)  # 0: plain class-conditional sampling
    torch_device = resolve_device(device)
    run.require_stage(FINETUNE_STAGE, STAGE)
    started = now()  # sampling runs before the stage's entry opens (it writes only at the end)
    state = torch_load_bytes(run.read_artifact(GENERATOR))
    sens = run.manifest["sensitive"]
    model = method.generator_from_config(state["config"])
    weights = "ema" if use_ema and "ema_state_dict" in state else "final"
    model.load_state_dict(state["ema_state_dict"] if weights == "ema" else state["state_dict"])
    model.to(torch_device).eval()
    labels = balanced_labels(n, sens["num_classes"])
    rng = torch.Generator().manual_seed(seed)
    chunks = []
    started = time.perf_counter()
    for start in range(0, n, batch_size):
        chunks.append(method.sample(model, labels[start:start + batch_size], rng, **options).cpu())
        progress("generate", min(start + batch_size, n), n)
    images = torch.cat(chunks)
    elapsed = time.perf_counter() - started

    def write_npz(buffer: io.BytesIO) -> None:
        np.savez_compressed(buffer, images=images.numpy(), labels=labels.numpy())

    def write_grid(buffer: io.BytesIO) -> None:
        per_class = 10
        order = torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in range(sens["num_classes"])])
        save_image(images[order].float() / 255.0, buffer, nrow=per_class, padding=2, format="png")

    config = {"n": n, "seed": seed, "weights": weights, "device": str(torch_device), **options}
    with stage_run(run, STAGE, config, inputs=[GENERATOR], started=started):
        run.write_artifact(STAGE, SYNTHETIC, write_npz)
        run.write_artifact(STAGE, GRID, write_grid)
    return {"n": n, "weights": weights, **options, "seconds": round(elapsed, 2),
            "images_per_second": round(n / max(elapsed, 1e-9), 2), "synthetic": str(run.artifact_path(SYNTHETIC)), "grid": str(run.artifact_path(GRID))}
