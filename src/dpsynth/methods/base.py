"""The method base class: one constructor shape for all methods.

A method says which stages it uses, builds its generator from an architecture dict
(`--arch`), gives the defaults of its DP fine-tuning, computes the per-sample loss and
samples labelled images. Stages never branch on a method's name, only on these
attributes.

Two kinds of private training:
- DP-SGD on the generator's per-sample loss (the default): `finetune` calibrates one
  PoissonGaussianEvent and runs `training.dpsgd.train_dp`;
- a method's own mechanism (GANs, mean embeddings): the class sets `own_mechanism = True`
  and implements `plan_private` (the calibrated ledger events, computed before anything
  is written) and `train_private` (which must run exactly the mechanisms planned).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import BadInput
from ..models.cvae import ConditionalVAE, CVAEConfig

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
    finetune_defaults: ClassVar[dict[str, Any]] = {
        "epochs": 2, "batch_size": 512, "clip": 1.0, "lr": 1e-3, "grad_sample_mode": "ghost",
        "noise_multiplicity": 1, "physical_batch_size": None, "ema": None, "optimizer": "dpsgd",
        "feedback_clip": None, "train_opts": {}}
    own_mechanism: ClassVar[bool] = False  # True: plan_private/train_private replace DP-SGD on the loss
    pretrain_defaults: ClassVar[dict[str, Any]] = {"epochs": 10, "batch_size": 128, "lr": 2e-3}
    sample_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, arch: dict | None = None):
        self.arch = dict(arch or {})
        allowed = {f.name for f in fields(self.config_class)} - set(DATA_KEYS)
        unknown = sorted(set(self.arch) - allowed)
        if unknown:
            raise BadInput(f"--arch key {unknown[0]!r} is not a setting of {self.name}'s generator; "
                           f"allowed: {', '.join(sorted(allowed))}")

    @property
    def uses_pretrain_stage(self) -> bool:
        return self.uses_pretraining or self.uses_central_warmup

    def build_generator(self, resolution: int, channels: int, num_classes: int) -> nn.Module:
        try:
            cfg = self.config_class(resolution=resolution, channels=channels, num_classes=num_classes, **self.arch)
        except TypeError as exc:
            raise BadInput(f"--arch for {self.name}: {exc}") from None
        return self.model_class(cfg)

    def generator_from_config(self, config: dict) -> nn.Module:
        return self.model_class(self.config_class(**config))

    @staticmethod
    def per_sample_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return model(x, y)

    def sample(self, model: nn.Module, labels: torch.Tensor, generator: torch.Generator, **options) -> torch.Tensor:
        return model.sample(labels, generator=generator, **options)

    # ---- own mechanism (own_mechanism = True) ------------------------------------------------
    def plan_private(self, *, dataset_size: int, opts: dict, spent: list, eps: float, delta: float) -> PrivatePlan:
        """The ledger events of `train_private`, noise calibrated so that spent + events stays
        <= eps (PRV upper bound). Reads no sensitive data except its size; raises
        BudgetExhausted/BadInput before anything is written."""
        raise NotImplementedError(f"{self.name} trains with DP-SGD on its loss; it has no own mechanism")

    def train_private(self, generator: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, opts: dict,
                      plan: PrivatePlan, device: torch.device, progress) -> nn.Module:
        """Run exactly the mechanisms of `plan` (already in the ledger) and return the trained
        generator. Whatever else touched sensitive data without DP (e.g. GS-WGAN's
        discriminators) must stay in memory: only the generator is written."""
        raise NotImplementedError(f"{self.name} trains with DP-SGD on its loss; it has no own mechanism")


@dataclass(frozen=True)
class PrivatePlan:
    """What a method's own mechanism will release: the events (in ledger order) and the
    calibrated settings (noise multipliers, steps, ...) recorded in the stage's config."""

    events: tuple
    settings: dict


def parse_arch(text: str | dict | None, flag: str = "--arch") -> dict:
    """--arch as JSON ('{"width": 16, "ch_mult": [2, 2]}') or k=v pairs ('width=16,ch_mult=2:2')."""
    if text is None or isinstance(text, dict):
        return dict(text or {})
    text = text.strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadInput(f"{flag} {text!r} is not valid JSON ({exc.msg})") from None
        if not isinstance(value, dict):
            raise BadInput(f"{flag} {text!r} must be a JSON object")
        return value
    arch = {}
    for item in text.split(","):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise BadInput(f"{flag} item {item!r} must look like key=value (e.g. width=16,ch_mult=2:2)")
        arch[key.strip()] = _scalar_or_list(raw.strip())
    return arch


def _scalar_or_list(raw: str) -> Any:
    if ":" in raw:
        return [_scalar_or_list(part) for part in raw.split(":")]
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw
