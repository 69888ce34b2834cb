"""DP-SGD with opacus: Poisson sampling, per-sample clipping, Gaussian noise.

Accounting is NOT done here: the caller computes the noise multiplier with the run's
ledger (`dpsynth.privacy`) and writes the event before calling `train_dp`. This module
only guarantees that the mechanism it runs is the one the event describes: Poisson
sampling at exactly `sample_rate`, exactly `steps` noisy steps, clipping at `clip`.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import TensorDataset

from ..errors import BadInput

GRAD_SAMPLE_MODES = ("hooks", "ghost", "functorch")
Progress = Callable[[int, int, float], None]


@dataclass(frozen=True)
class DPSGDPlan:
    """What the ledger event will say; computed before any sensitive data is touched."""

    dataset_size: int
    batch_size: int
    epochs: int

    def __post_init__(self) -> None:
        if self.dataset_size < 1:
            raise BadInput(f"sensitive dataset is empty (size {self.dataset_size})")
        if not (1 <= self.batch_size <= self.dataset_size):
            raise BadInput(f"--batch-size {self.batch_size} must be between 1 and the dataset size {self.dataset_size}")
        if self.epochs < 1:
            raise BadInput(f"--epochs {self.epochs} must be >= 1")

    @property
    def steps_per_epoch(self) -> int:
        return max(1, round(self.dataset_size / self.batch_size))

    @property
    def sample_rate(self) -> float:
        # opacus' DPDataLoader draws len = round(1/q) batches per epoch; we pick q so that
        # expected batch = batch_size and the loader's length is what we count.
        return 1.0 / self.steps_per_epoch

    @property
    def steps(self) -> int:
        return self.epochs * self.steps_per_epoch


def check_secure_available(secure: bool) -> None:
    """opacus' secure_mode needs torchcsprng; say so before any privacy event is written."""
    if secure and importlib.util.find_spec("torchcsprng") is None:
        raise BadInput("--secure needs the torchcsprng package (opacus secure_mode), which is not installed; "
                       "install it or drop --secure")


def check_dp_compatible(model: nn.Module) -> None:
    """Fail loudly if a layer would break per-sample privacy (e.g. BatchNorm mixes samples)."""
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise BadInput(f"model is not DP-SGD compatible: {errors[0]}")


def train_dp(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             per_sample_loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor], *,
             plan: DPSGDPlan, noise_multiplier: float, clip: float, lr: float,
             grad_sample_mode: str = "ghost", secure: bool = False, optimizer: str = "adam",
             progress: Progress | None = None) -> nn.Module:
    """Train `model` in place with DP-SGD; returns the underlying (unwrapped) module."""
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise BadInput(f"--grad-sample-mode {grad_sample_mode!r} is unknown; choose one of {', '.join(GRAD_SAMPLE_MODES)}")
    if not (clip > 0 and math.isfinite(clip)):
        raise BadInput(f"--clip {clip!r} must be a finite number > 0")
    if len(images) != plan.dataset_size:
        raise BadInput(f"plan was made for {plan.dataset_size} images, got {len(images)}")
    check_dp_compatible(model)
    # No seeded generator on purpose: which images a Poisson batch holds must stay secret,
    # so sampling (and opacus' noise) use the global RNG that the caller seeds from OS entropy.
    check_secure_available(secure)
    engine = PrivacyEngine(secure_mode=secure)
    loader = DPDataLoader(TensorDataset(images, labels), sample_rate=plan.sample_rate,
                          generator=engine.secure_rng if secure else None)
    # opacus derives steps as int(1/q), which float rounding can make one short.
    loader.batch_sampler.steps = plan.steps_per_epoch
    if len(loader) != plan.steps_per_epoch or loader.sample_rate != plan.sample_rate:
        raise RuntimeError("DP data loader length differs from the accounted plan")
    optimizers = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}
    if optimizer not in optimizers:
        raise BadInput(f"optimizer {optimizer!r} is unknown; choose one of {', '.join(optimizers)}")
    optimizer = optimizers[optimizer](model.parameters(), lr=lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dp_model, dp_optimizer, *rest = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
            max_grad_norm=clip, poisson_sampling=False,  # loader above is already Poisson
            grad_sample_mode=grad_sample_mode,
            **({"criterion": nn.MSELoss()} if grad_sample_mode == "ghost" else {}),
        )
    dp_loader = rest[-1]
    dp_model.train()
    step = 0
    for _epoch in range(plan.epochs):
        for x, y in dp_loader:
            dp_optimizer.zero_grad(set_to_none=True)
            if len(x) == 0:
                # Skipping an empty Poisson batch releases less than the ledger counts: safe.
                step += 1
                continue
            losses = per_sample_loss(dp_model, x, y)
            if losses.shape != (len(x),):
                raise RuntimeError(f"per-sample loss must have shape ({len(x)},), got {tuple(losses.shape)}")
            if grad_sample_mode == "ghost":
                DPTensorFastGradientClipping(dp_model, dp_optimizer, losses, "mean").backward()
            else:
                losses.mean().backward()
            dp_optimizer.step()
            step += 1
            if progress:
                progress(step, plan.steps, float(losses.detach().mean()))
    if step != plan.steps:
        raise RuntimeError(f"ran {step} DP-SGD steps but the ledger recorded {plan.steps}")
    return dp_model._module if hasattr(dp_model, "_module") else model


def train_nonprivate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                     per_sample_loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor], *,
                     epochs: int, batch_size: int, lr: float, seed: int = 0,
                     progress: Progress | None = None) -> nn.Module:
    """Plain Adam on public data (pretraining; no privacy cost)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(TensorDataset(images, labels), batch_size=batch_size,
                                         shuffle=True, generator=generator, drop_last=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    total, step = epochs * len(loader), 0
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = per_sample_loss(model, x, y).mean()
            loss.backward()
            optimizer.step()
            step += 1
            if progress:
                progress(step, total, float(loss.detach()))
    return model
