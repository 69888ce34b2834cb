"""Stage `generate`: labelled synthetic images from the DP generator (post-processing: no cost)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from torchvision.utils import save_image

from ..methods import get_method
from .common import Progress, check_positive, no_progress, torch_load_bytes
from .finetune import GENERATOR, STAGE as FINETUNE_STAGE
from ..rundir import RunDir

STAGE = "generate"
SYNTHETIC = "synthetic.npz"
GRID = "samples.png"


def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    """n labels, as equal per class as n allows (DPImageBench generates class-balanced sets)."""
    return torch.arange(n) % num_classes


def run_generate(run_path: str | Path, *, n: int = 10000, seed: int = 0, batch_size: int = 1000,
                 progress: Progress = no_progress) -> dict:
    check_positive("--n", n, integer=True)
    run = RunDir.open(run_path)
    run.require_stage(FINETUNE_STAGE, STAGE)
    state = torch_load_bytes(run.read_artifact(GENERATOR))
    sens = run.manifest["sensitive"]
    model = get_method(run.manifest["method"]).build_generator(sens["resolution"], sens["channels"],
                                                              sens["num_classes"])
    model.load_state_dict(state["state_dict"])
    model.eval()
    labels = balanced_labels(n, sens["num_classes"])
    rng = torch.Generator().manual_seed(seed)
    chunks = []
    for start in range(0, n, batch_size):
        chunks.append(model.sample(labels[start:start + batch_size], generator=rng))
        progress("generate", min(start + batch_size, n), n)
    images = torch.cat(chunks)

    def write_npz(buffer: io.BytesIO) -> None:
        np.savez_compressed(buffer, images=images.numpy(), labels=labels.numpy())

    def write_grid(buffer: io.BytesIO) -> None:
        per_class = 10
        order = torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in range(sens["num_classes"])])
        save_image(images[order].float() / 255.0, buffer, nrow=per_class, padding=2, format="png")

    with run.lock():
        run.begin_stage(STAGE, {"n": n, "seed": seed}, inputs=[GENERATOR])
        run.write_artifact(STAGE, SYNTHETIC, write_npz)
        run.write_artifact(STAGE, GRID, write_grid)
        run.end_stage(STAGE)
    return {"n": n, "synthetic": str(run.artifact_path(SYNTHETIC)), "grid": str(run.artifact_path(GRID))}
