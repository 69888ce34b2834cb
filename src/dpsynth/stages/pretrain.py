"""Stage `pretrain`: non-private training of the generator on public data (no privacy cost)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from ..errors import BadInput
from ..methods import get_method
from ..training.dpsgd import train_nonprivate
from .common import (DataSettings, Progress, check_positive, load_public, no_progress, open_or_create_run,
                     settings_from_run, torch_bytes)
from .select_public import SELECTION, STAGE as SELECT_STAGE

STAGE = "pretrain"
PRETRAINED = "pretrained.pt"


def run_pretrain(run_path: str | Path, settings: DataSettings | None = None, *, epochs: int = 10,
                 batch_size: int = 128, lr: float = 2e-3, method: str | None = None,
                 delta: float | None = None, progress: Progress = no_progress) -> dict:
    check_positive("--epochs", epochs, integer=True)
    check_positive("--batch-size", batch_size, integer=True)
    check_positive("--lr", lr)
    run, sensitive = open_or_create_run(run_path, method=method, settings=settings, delta=delta)
    method_obj = get_method(run.manifest["method"])
    if not method_obj.uses_pretraining:
        raise BadInput(f"method {method_obj.name!r} has no pretraining stage; run 'dpsynth finetune' next")
    data = settings_from_run(run) if run.manifest["stages"] or settings is None else settings
    if settings is not None and settings.public:
        data = replace(data, public=settings.public)

    selection = None
    if method_obj.uses_public_selection:
        run.require_stage(SELECT_STAGE, STAGE)
        selection = json.loads(run.read_artifact(SELECTION))
        data = replace(data, public=selection["public"])
    public = load_public(data, sensitive)
    if selection is not None:
        # PrivImage: the public classes chosen for a sensitive class are relabelled to it.
        index = torch.tensor(selection["public_indices"], dtype=torch.long)
        relabel = {s["public_class"]: s["sensitive_class"] for s in selection["selected"]}
        images = public.images[index]
        labels = torch.tensor([relabel[int(c)] for c in public.labels[index]], dtype=torch.long)
    else:
        # Whole public set; its labels are folded onto the sensitive label ids (PDP-style pretraining).
        images, labels = public.images, public.labels % sensitive.num_classes
    if len(images) == 0:
        raise BadInput(f"the public subset for pretraining is empty (public dataset {public.name})")

    _, c, r, _ = sensitive.images.shape
    generator = method_obj.build_generator(r, c, sensitive.num_classes)
    config = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "public": public.name,
              "public_images": int(len(images)), "generator": generator.cfg.to_dict()}
    with run.lock():
        run.begin_stage(STAGE, config, inputs=[SELECTION] if selection is not None else [])
        train_nonprivate(generator, images, labels, method_obj.per_sample_loss, epochs=epochs,
                         batch_size=batch_size, lr=lr, seed=data.seed,
                         progress=lambda d, t, _l: progress("pretrain (public)", d, t))
        run.write_artifact(STAGE, PRETRAINED, torch_bytes({"state_dict": generator.state_dict(),
                                                           "config": generator.cfg.to_dict()}))
        run.end_stage(STAGE)
    return {"public_images": int(len(images)), "epochs": epochs, "epsilon_spent": 0.0}

