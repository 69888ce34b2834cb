"""Stage `pretrain`: the generator's start before DP fine-tuning.

- public pretraining (PDP-Diffusion, PrivImage, the CVAE methods): non-private training on
  public data, the selected subset relabelled when select-public ran; no privacy cost;
- a private warm-up (DP-FETA: DP central images of the SENSITIVE set; FETA-Pro: those and one
  DP random-Fourier-feature release that an auxiliary generator is fitted to), each release a
  ledger event written before any of them exists, then non-private training on what they
  released (post-processing).
Methods that use neither say so and change nothing.
"""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..errors import BadInput
from ..methods import get_method, parse_arch
from ..privacy.accountant import compose_epsilon
from ..training.device import resolve_device
from ..training.dpsgd import train_nonprivate
from ..validation import check_positive
from .common import (DataSettings, Progress, declared_size, load_public, no_progress, open_or_create_run,
                     settings_from_run, torch_bytes)
from .lifecycle import stage_run
from .names import AUXILIARY, CENTRAL, PRETRAIN as STAGE, PRETRAINED, SELECT_PUBLIC as SELECT_STAGE, SELECTION



def run_pretrain(run_path: str | Path, settings: DataSettings | None = None, *, epochs: int | None = None,
                 batch_size: int | None = None, lr: float | None = None, method: str | None = None,
                 delta: float | None = None, arch: str | dict | None = None, device: str | None = None,
                 central_sigma: float = 5.0, central_queries: int = 5, central_batch: int = 6000,
                 augment: bool = True, warmup: dict | None = None, train_opts: str | dict | None = None,
                 progress: Progress = no_progress) -> dict:
    """`warmup`: a private warm-up's own options beyond the central images' (FETA-Pro's
    freq_sigma, warmup_order, freq_epochs, freq_batch_size, aux_opts); None values are unset.
    `train_opts`: the method's own public-pretraining settings (e.g. DP-LDM's ae_epochs)."""
    if method is not None and not get_method(method).uses_pretrain_stage:
        return _skipped(method)
    run, sensitive = open_or_create_run(run_path, method=method, settings=settings, delta=delta)
    method_obj = get_method(run.manifest["method"], parse_arch(arch))
    if not method_obj.uses_pretrain_stage:
        return _skipped(method_obj.name)
    warmup = {k: v for k, v in (warmup or {}).items() if v is not None}
    if warmup and not method_obj.uses_central_warmup:
        raise BadInput(f"`{sorted(warmup)[0]}` applies to a private warm-up (dp-feta, feta-pro), not to "
                       f"{method_obj.name}; drop it")
    defaults = method_obj.pretrain_defaults
    epochs = defaults["epochs"] if epochs is None else epochs
    batch_size = defaults["batch_size"] if batch_size is None else batch_size
    lr = defaults["lr"] if lr is None else lr
    check_positive("epochs", epochs, integer=True)
    check_positive("batch_size", batch_size, integer=True)
    check_positive("lr", lr)
    options = _train_opts(method_obj, train_opts)
    torch_device = resolve_device(device)
    _, c, r, _ = sensitive.images.shape
    torch.manual_seed(run.manifest["settings"].get("seed", 0))  # recorded when the run was created
    generator = method_obj.build_generator(r, c, sensitive.num_classes)

    if method_obj.uses_central_warmup:
        return _central_warmup(run, sensitive, method_obj, generator, epochs=epochs, batch_size=batch_size, lr=lr,
                               sigma=central_sigma, queries=central_queries, central_batch=central_batch,
                               augment=augment, options=warmup, device=torch_device, progress=progress)

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

    config = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "public": public.name,
              "public_images": int(len(images)), "device": str(torch_device), "generator": generator.cfg.to_dict()}
    if options:
        config["train_opts"] = options
    with stage_run(run, STAGE, config, inputs=[SELECTION] if selection is not None else []):
        extra = method_obj.pretrain_public(generator.to(torch_device), images, labels, epochs=epochs,
                                           batch_size=batch_size, lr=lr, seed=data.seed, train_opts=options,
                                           progress=progress)
        if extra:  # recorded before the stage completes (e.g. the latent scale of DP-LDM)
            run.manifest["stages"][STAGE]["config"].update(extra)
        _save_generator(run, generator)
    return {"public_images": int(len(images)), "epochs": epochs,
            "epsilon_spent": compose_epsilon(run.events(), run.delta).upper if run.events() else 0.0}


def _train_opts(method_obj, given: str | dict | None) -> dict:
    """The method's pretraining settings (its pretrain_defaults["train_opts"]) with the given
    ones over them; a key the method does not have is refused."""
    defaults = dict(method_obj.pretrain_defaults.get("train_opts") or {})
    asked = parse_arch(given, "`train_opts`")
    unknown = sorted(set(asked) - set(defaults))
    if unknown:
        raise BadInput(f"`train_opts` key {unknown[0]!r} is not a pretraining setting of {method_obj.name}; "
                       f"allowed: {', '.join(sorted(defaults)) or 'none'}")
    return {**defaults, **asked}


def _skipped(method: str) -> dict:
    return {"skipped": True, "reason": f"method {method!r} has no pretrain stage; run 'dpsynth finetune' next"}


def _save_generator(run, generator) -> None:
    generator = generator.cpu()
    run.write_artifact(STAGE, PRETRAINED, torch_bytes({"state_dict": generator.state_dict(),
                                                      "config": generator.cfg.to_dict()}))


def _central_warmup(run, sensitive, method_obj, generator, *, epochs, batch_size, lr, sigma, queries, central_batch,
                    augment, options, device, progress) -> dict:
    """A method's private warm-up: its releases of the sensitive set (DP-FETA: the noisy central
    images; FETA-Pro: those and one random-Fourier-feature release), every event written before
    any release runs; then non-private training on what they released (post-processing), one
    released set after another in the method's order."""
    plan = method_obj.plan_warmup(dataset_size=declared_size(run), sigma=sigma, queries=queries,
                                  batch=central_batch, spent=run.events(), delta=run.delta,
                                  target=run.manifest["privacy"].get("target_epsilon"), epochs=epochs,
                                  batch_size=batch_size, augment=augment, options=options)
    config = {"epochs": epochs, "batch_size": batch_size, "lr": lr, **plan.settings, "augment": augment,
              "device": str(device), "generator": generator.cfg.to_dict()}
    with stage_run(run, STAGE, config, events=plan.events):  # written before any release exists
        release = method_obj.release_warmup(sensitive.images, sensitive.labels, sensitive.num_classes,
                                            plan=plan, device=device, progress=progress)
        if release.central is not None:
            central, labels = release.central

            def write_npz(buffer: io.BytesIO) -> None:
                np.savez_compressed(buffer, images=central.numpy(), labels=labels.numpy())

            run.write_artifact(STAGE, CENTRAL, write_npz)
        if release.auxiliary is not None:  # FETA-Pro's auxiliary generator: fitted to a DP release only
            run.write_artifact(STAGE, AUXILIARY, torch_bytes({"state_dict": release.auxiliary.state_dict(),
                                                               "config": release.auxiliary.cfg.to_dict()}))
        generator = generator.to(device)
        for warm in release.sets:
            train_nonprivate(generator, warm.images, warm.labels, method_obj.per_sample_loss, epochs=warm.epochs,
                             batch_size=warm.batch_size, lr=lr, seed=0,
                             augment=_rand_augment() if warm.augment else None, progress=progress,
                             phase=f"warm-up ({warm.name})")
        _save_generator(run, generator)
    result = {**_scalars(plan.settings), "warmup_sets": [{"name": w.name, "images": int(len(w.images)),
                                                          "epochs": w.epochs, "batch_size": w.batch_size}
                                                         for w in release.sets],
              "epsilon_spent": compose_epsilon(run.events(), run.delta).upper, "epochs": epochs}
    if release.central is not None:
        result["central_images"] = int(len(release.central[0]))
    return result


def _scalars(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if isinstance(v, (int, float, str))}


def _rand_augment():
    """DP-FETA's augmentation: RandAugment, 2 ops, magnitude drawn from 1..9 per image."""
    from torchvision.transforms import v2

    ops = [v2.RandAugment(num_ops=2, magnitude=m) for m in range(1, 10)]

    def augment(x: torch.Tensor) -> torch.Tensor:
        picks = torch.randint(0, len(ops), (len(x),))
        return torch.stack([ops[int(i)](img) for i, img in zip(picks, x)])

    return augment
