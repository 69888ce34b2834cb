"""The method base class: one constructor shape for all methods, and one private-training
contract for the `finetune` stage.

A method says which stages it uses, builds its generator from an architecture dict
(`--arch`), gives the defaults of its DP fine-tuning, computes the per-sample loss and
samples labelled images. Stages never branch on a method's name, only on these
attributes.

Private training, one flow for every method: `finetune` resolves the options once, asks
`plan_private` for the ledger events and calibrated settings (before anything is written),
records them, then calls `train_private`, which must run exactly the planned mechanisms and
takes one `Checkpointing` object (`training.checkpoint`). The base class implements DP-SGD
on the generator's per-sample loss (`training.dpsgd.train_dp`); a method with its own
mechanism (GANs, mean embeddings: `own_mechanism = True`) overrides the two. A method whose
private part is a single release (`iterative = False`) has no checkpoints or --resume.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import BadInput
from ..models.cvae import ConditionalVAE, CVAEConfig
from ..privacy.plans import (DPSGDPlan, applied_noise_std, calibrate_private_optimizer, feedback_noise_multiplier,
                             private_optimizer_events, resolve_feedback_clip)
from ..progress import Progress
from ..training.checkpoint import Checkpointing
from ..training.options import FinetuneOptions

STAGE = "finetune"

DATA_KEYS = ("resolution", "channels", "num_classes")  # set by the data, never by --arch


class Method:
    """Base class. Subclasses set the class attributes; the constructor shape is shared."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    uses_public_selection: ClassVar[bool] = False   # select-public (PrivImage's semantic query)
    uses_pretraining: ClassVar[bool] = False        # pretrain on public data
    uses_central_warmup: ClassVar[bool] = False     # pretrain on DP central images (DP-FETA)
    config_class: ClassVar[type] = CVAEConfig
    model_class: ClassVar[type] = ConditionalVAE
    # DP fine-tuning defaults; every key is a `finetune` option a user can override.
    # The keys are also the finetune options the method accepts: a given option whose key is
    # absent here is refused. "train_opts" holds method-specific settings (--train-opts k=v).
    # A DP-SGD method (not own_mechanism) also has the DP-SGD loop's own settings (precision:
    # training.options.DPSGD_DEFAULTS, merged in by options.method_defaults).
    finetune_defaults: ClassVar[dict[str, Any]] = {
        "epochs": 2, "batch_size": 512, "clip": 1.0, "lr": 1e-3, "grad_sample_mode": "bk",
        "noise_multiplicity": 1, "physical_batch_size": None, "ema": None, "private_optimizer": "dpsgd",
        "feedback_clip": None, "train_opts": {}}
    own_mechanism: ClassVar[bool] = False  # True: plan_private/train_private replace DP-SGD on the loss
    # True: batch_size and epochs make a DP-SGD schedule (privacy.plans.DPSGDPlan), so `finetune`
    # adapts the defaults of the two to a small declared N (training.options.adapt_to_size).
    adapts_to_size: ClassVar[bool] = True
    iterative: ClassVar[bool] = True  # False: one release, nothing to checkpoint or resume
    # True: `finetune` sets `self.feature_network` (the run's named feature network, the one
    # `evaluate` uses: Inception-v3 when its weights are on disk, else the public-only query net)
    # before planning; PE embeds images in it.
    uses_feature_network: ClassVar[bool] = False
    # Public pretraining defaults; "train_opts", when present, holds the method's own settings
    # (pretrain --train-opts k=v), and a given key absent from it is refused.
    pretrain_defaults: ClassVar[dict[str, Any]] = {"epochs": 10, "batch_size": 128, "lr": 2e-3}
    sample_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, arch: dict | None = None):
        self.arch = dict(arch or {})
        allowed = {f.name for f in fields(self.config_class)} - set(DATA_KEYS)
        unknown = sorted(set(self.arch) - allowed)
        if unknown:
            raise BadInput(f"`arch` key {unknown[0]!r} is not a setting of {self.name}'s generator; "
                           f"allowed: {', '.join(sorted(allowed))}")

    @property
    def uses_pretrain_stage(self) -> bool:
        return self.uses_pretraining or self.uses_central_warmup

    def build_generator(self, resolution: int, channels: int, num_classes: int) -> nn.Module:
        try:
            cfg = self.config_class(resolution=resolution, channels=channels, num_classes=num_classes, **self.arch)
        except TypeError as exc:
            raise BadInput(f"`arch` for {self.name}: {exc}") from None
        return self.model_class(cfg)

    def generator_from_config(self, config: dict) -> nn.Module:
        return self.model_class(self.config_class(**config))

    @staticmethod
    def per_sample_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return model(x, y)

    def sample(self, model: nn.Module, labels: torch.Tensor, generator: torch.Generator, **options) -> torch.Tensor:
        return model.sample(labels, generator=generator, **options)

    # ---- public pretraining (pretrain): no privacy cost ----------------------------------------
    def pretrain_public(self, generator: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, epochs: int,
                        batch_size: int, lr: float, seed: int, train_opts: dict, progress: Progress) -> dict:
        """Non-private training on PUBLIC images (the stage has checked that they are public).
        Returns what the stage should record beside its settings (nothing by default)."""
        from ..training.dpsgd import train_nonprivate

        train_nonprivate(generator, images, labels, self.per_sample_loss, epochs=epochs, batch_size=batch_size,
                         lr=lr, seed=seed, progress=progress, phase="pretrain (public)")
        return {}

    # ---- private training (finetune): DP-SGD by default ---------------------------------------
    def prepare_private(self, generator: nn.Module, opts: FinetuneOptions) -> nn.Module:
        """The generator as DP-SGD trains it, built from the pretrained one before any check or
        event: e.g. which parameters stay frozen (requires_grad=False, so opacus computes and
        stores nothing for them) or adapters added. Identity by default."""
        return generator

    def check_generator(self, generator: nn.Module, *, channels: int, resolution: int, num_classes: int,
                        opts: FinetuneOptions) -> None:
        """Before any event is written: the generator must suit the private trainer. DP-SGD: no
        layer that mixes samples (random inputs of the sensitive set's shape; no data read)."""
        from ..training.dp_guards import check_per_sample_gradients
        from ..training.dpsgd import check_dp_compatible

        check_dp_compatible(generator)
        if opts.grad_sample_mode != "vmap":  # vmap computes each example alone: nothing can mix
            probe = torch.Generator().manual_seed(0)
            x = torch.randint(0, 256, (2, channels, resolution, resolution), dtype=torch.uint8, generator=probe)
            y = torch.randint(0, num_classes, (2,), generator=probe)
            check_per_sample_gradients(generator, x, y, self.per_sample_loss)
            if opts.grad_sample_mode == "bk":  # and every trainable parameter inside a layer bk can clip
                from ..training.bookkeeping import check_bookkeeping_covers, trainable_layers

                trainable_layers(generator)
                check_bookkeeping_covers(generator, x, y, self.per_sample_loss)

    def plan_private(self, *, dataset_size: int, opts: FinetuneOptions, spent: list, eps: float,
                     delta: float) -> PrivatePlan:
        """The ledger events of `train_private`, noise calibrated so that spent + events stays
        <= eps (PRV upper bound). Reads no sensitive data except its size; raises
        BudgetExhausted/BadInput before anything is written. The settings must be enough to
        run (and, on resume, re-run) `train_private` without planning again."""
        schedule = DPSGDPlan(dataset_size=dataset_size, batch_size=opts.batch_size, epochs=opts.epochs)
        q, steps, kind = schedule.sample_rate, schedule.steps, opts.private_optimizer or "dpsgd"
        feedback_clip = resolve_feedback_clip(kind, opts.feedback_clip, clip=opts.clip, sample_rate=q)
        # EFSGD has two events: its error feedback is a hidden state, not subsampled (privacy/plans.py).
        sigma = calibrate_private_optimizer(kind, spent, eps, delta, sample_rate=q, steps=steps, clip=opts.clip,
                                            feedback_clip=feedback_clip, stage=STAGE)
        events = private_optimizer_events(kind, STAGE, noise_multiplier=sigma, sample_rate=q, steps=steps,
                                          clip=opts.clip, feedback_clip=feedback_clip)
        settings = {"noise_multiplier": sigma, "sample_rate": q, "steps": steps, "dataset_size": dataset_size,
                    "epochs": opts.epochs, "batch_size": opts.batch_size}
        if kind == "efsgd":
            settings.update(feedback_clip=feedback_clip, noise_std=applied_noise_std(sigma, opts.clip),
                            feedback_noise_multiplier=feedback_noise_multiplier(sigma, opts.clip, feedback_clip))
        return PrivatePlan(events=tuple(events), settings=settings)

    def private_steps(self, plan: PrivatePlan) -> int:
        """How many private steps `train_private` takes (its checkpoints count these)."""
        return int(plan.settings["steps"])

    def train_private(self, generator: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                      opts: FinetuneOptions, plan: PrivatePlan, device: torch.device, progress: Progress,
                      checkpoints: Checkpointing) -> Trained:
        """Run exactly the mechanisms of `plan` (already in the ledger) and return the trained
        generator. Whatever else touched sensitive data without DP (e.g. GS-WGAN's
        discriminators) must stay in memory or in checkpoints: only the generator is written."""
        from ..training.dpsgd import ExponentialMovingAverage, train_dp

        s = plan.settings
        schedule = DPSGDPlan(dataset_size=s["dataset_size"], batch_size=s["batch_size"], epochs=s["epochs"])
        if schedule.steps != s["steps"] or schedule.sample_rate != s["sample_rate"]:
            raise RuntimeError("DP-SGD schedule differs from the planned events")
        generator = generator.to(device)
        ema = ExponentialMovingAverage(generator, opts.ema) if opts.ema else None
        trained = train_dp(generator, images, labels, self.per_sample_loss, plan=schedule,
                           noise_multiplier=s["noise_multiplier"], opts=opts.replace(feedback_clip=s.get("feedback_clip")),
                           ema=ema, progress=progress, phase="finetune (DP-SGD)", checkpoints=checkpoints)
        return Trained(trained, None if ema is None else ema.state_dict())


@dataclass(frozen=True)
class PrivatePlan:
    """What a method's private training will release: the events (in ledger order) and the
    calibrated settings (noise multipliers, steps, ...) recorded in the stage's config."""

    events: tuple
    settings: dict


@dataclass(frozen=True)
class Trained:
    """The result of `train_private`: the generator (the only thing written) and, when the
    method keeps a separate EMA of its weights, that EMA (exported beside it)."""

    generator: nn.Module
    ema_state_dict: dict | None = None
