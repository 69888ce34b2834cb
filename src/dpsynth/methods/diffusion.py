"""The EDM diffusion methods: DPDM, PDP-Diffusion, PrivImage, DP-FETA."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..errors import BadInput
from ..mechanisms.central_images import central_sample_rate, noisy_central_images
from ..models.edm import EDMConfig, EDMDiffusion
from ..privacy.accountant import epsilon_upper
from ..privacy.calibration import smallest_sigma
from ..privacy.refusal import Shortfall, budget_refusal, round_up
from ..privacy.events import PoissonGaussianEvent
from ..validation import check_positive
from .base import Method, PrivatePlan
from .registry import register_method


class DiffusionMethod(Method):
    """The EDM diffusion family (DPDM, PDP-Diffusion, PrivImage, DP-FETA) on one U-Net.

    Defaults follow DPImageBench's configs for these methods (configs/<method>/
    fmnist_28_eps10.0.yaml): Adam 3e-4, clip 1e-3 (DPDM's small clipping norm), EMA 0.999,
    logical batch 4096; noise multiplicity 8 as PrivImage's paper (DPImageBench's configs
    use 32). Epochs default to a CPU-sized 2; recipes set the published 150.
    """

    config_class, model_class = EDMConfig, EDMDiffusion
    finetune_defaults = {"epochs": 2, "batch_size": 4096, "clip": 1e-3, "lr": 3e-4, "grad_sample_mode": "bk",
                         "noise_multiplicity": 8, "physical_batch_size": 64, "ema": 0.999, "private_optimizer": "dpsgd",
                         "feedback_clip": None, "train_opts": {}}
    pretrain_defaults = {"epochs": 25, "batch_size": 64, "lr": 3e-4}
    sample_defaults = {"steps": 18, "guidance": 0.0}


class DPDM(DiffusionMethod):
    name = "dpdm"
    description = "DPDM: DP-SGD on an EDM diffusion model from scratch (no public data)"


class PDPDiffusion(DiffusionMethod):
    name = "pdp-diffusion"
    description = "PDP-Diffusion: pretrain on the whole public set, then DP-SGD"
    uses_pretraining = True


class PrivImage(DiffusionMethod):
    name = "privimage"
    description = "PrivImage: semantic query, pretrain on the selected public subset, then DP-SGD"
    uses_public_selection = uses_pretraining = True


@dataclass(frozen=True)
class WarmupSet:
    """One released (DP) labelled image set the diffusion model warms up on, with its schedule."""

    name: str
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor
    epochs: int
    batch_size: int
    augment: bool


@dataclass(frozen=True)
class WarmupRelease:
    """What a private warm-up released, all of it DP output: the sets in training order, the
    central images (saved as an artifact) and FETA-Pro's auxiliary generator (saved too)."""

    sets: tuple[WarmupSet, ...]
    central: tuple[torch.Tensor, torch.Tensor] | None = None
    auxiliary: torch.nn.Module | None = None


def check_within_target(spent: list, events: list, delta: float, target: float | None, what: str,
                        knobs: dict[str, float]) -> None:
    """Refuse (before anything is written) warm-up releases that would pass the run's target, naming
    the noise that fits: each event's noise multiplier is its knob's value (`knobs`: parameter ->
    value), so the least common factor that fits, applied to every knob and rounded up, fits too."""
    if target is None or epsilon_upper([*spent, *events], delta) <= target:
        return

    def scaled(factor: float) -> list:
        return [replace(e, noise_multiplier=e.noise_multiplier * factor) for e in events]

    factor = smallest_sigma(lambda k: epsilon_upper([*spent, *scaled(k)], delta), float(target), 1.0, 1e4)
    knob_text = " and ".join(f"`{name}` {round_up(value * factor):g}" for name, value in knobs.items())
    shortfall = Shortfall(stage="pretrain", target=float(target), delta=delta, spent=tuple(spent),
                          planned=tuple(events), what=what, param=None)
    raise budget_refusal(shortfall, [
        f"in this run: pretrain with {knob_text} or more (the least noise that fits)" if factor else None,
        "or, in a new `run` directory, pretrain first, then finetune with the `eps` you want: its calibration "
        "leaves room for the warm-up releases"])


class DPFETA(DiffusionMethod):
    name = "dp-feta"
    description = "DP-FETA: warm-up on DP central images (noisy class means), then DP-SGD"
    uses_central_warmup = True
    warmup_summary = "DP central images"  # `dpsynth methods`' pretrain column
    # DP-FETA's warm-up: 2000 steps of batch 50 on 50 central images, Adam 3e-4.
    pretrain_defaults = {"epochs": 2000, "batch_size": 50, "lr": 3e-4}
    # pretrain options beyond the central images' (FETA-Pro's frequency warm-up); none here.
    warmup_defaults: dict = {}

    def warmup_options(self, given: dict) -> dict:
        """The method's own warm-up options: `given` (None values dropped) over its defaults;
        an option the method does not take is refused by name."""
        given = {k: v for k, v in given.items() if v is not None}
        unknown = sorted(set(given) - set(self.warmup_defaults))
        if unknown:
            raise BadInput(f"`{unknown[0]}` is not an option of {self.name}'s warm-up; drop it")
        return {**self.warmup_defaults, **given}

    @staticmethod
    def central_event(*, dataset_size: int, sigma: float, queries: int, batch: int, note: str) -> PoissonGaussianEvent:
        check_positive("central_sigma", sigma)
        check_positive("central_queries", queries, integer=True)
        check_positive("central_batch", batch, integer=True)
        return PoissonGaussianEvent(stage="pretrain", noise_multiplier=float(sigma),
                                    sample_rate=central_sample_rate(dataset_size, batch), steps=int(queries),
                                    note=note)

    def plan_warmup(self, *, dataset_size: int, sigma: float, queries: int, batch: int, spent: list,
                    delta: float, target: float | None, epochs: int, batch_size: int, augment: bool,
                    options: dict | None = None) -> PrivatePlan:
        """The central-image release: `queries` Poisson batches of expected size `batch`, noise
        multiplier `sigma`, as one PoissonGaussianEvent; refused when it would pass `target`.
        `epochs`, `batch_size`, `augment`: the warm-up on them (post-processing)."""
        self.warmup_options(options or {})
        event = self.central_event(dataset_size=dataset_size, sigma=sigma, queries=queries, batch=batch,
                                   note="dp-feta: central images (noisy class means)")
        check_within_target(spent, [event], delta, target, f"central images (central_sigma={sigma:g})",
                            {"central_sigma": float(sigma)})
        return PrivatePlan(events=(event,), settings={
            "central_sigma": float(sigma), "central_queries": int(queries), "central_sample_rate": event.sample_rate,
            "dataset_size": dataset_size, "central_epochs": int(epochs), "central_batch_size": int(batch_size),
            "augment": bool(augment)})

    def release_central(self, images, labels, num_classes: int, *, plan: PrivatePlan):
        s = plan.settings
        return noisy_central_images(images, labels, num_classes, noise_multiplier=s["central_sigma"],
                                    sample_rate=s["central_sample_rate"], queries=s["central_queries"],
                                    dataset_size=s["dataset_size"])

    def release_warmup(self, images, labels, num_classes: int, *, plan: PrivatePlan, device=None,
                       progress=None) -> WarmupRelease:
        """Run exactly the planned release (already in the ledger): the noisy central images."""
        central, central_labels = self.release_central(images, labels, num_classes, plan=plan)
        s = plan.settings
        warm = WarmupSet("central images", central, central_labels, s["central_epochs"], s["central_batch_size"],
                         s["augment"])
        return WarmupRelease(sets=(warm,), central=(central, central_labels))


for _cls in (DPDM, PDPDiffusion, PrivImage, DPFETA):
    register_method(_cls)
