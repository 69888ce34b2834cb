"""The EDM diffusion methods: DPDM, PDP-Diffusion, PrivImage, DP-FETA."""

from __future__ import annotations

from dataclasses import replace

from ..mechanisms.central_images import central_sample_rate, noisy_central_images
from ..models.edm import EDMConfig, EDMDiffusion
from ..privacy.accountant import compose_epsilon, epsilon_upper
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
    finetune_defaults = {"epochs": 2, "batch_size": 4096, "clip": 1e-3, "lr": 3e-4, "grad_sample_mode": "vmap",
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


class DPFETA(DiffusionMethod):
    name = "dp-feta"
    description = "DP-FETA: warm-up on DP central images (noisy class means), then DP-SGD"
    uses_central_warmup = True
    # DP-FETA's warm-up: 2000 steps of batch 50 on 50 central images, Adam 3e-4.
    pretrain_defaults = {"epochs": 2000, "batch_size": 50, "lr": 3e-4}

    def plan_warmup(self, *, dataset_size: int, sigma: float, queries: int, batch: int, spent: list,
                    delta: float, target: float | None) -> PrivatePlan:
        """The central-image release: `queries` Poisson batches of expected size `batch`, noise
        multiplier `sigma`, as one PoissonGaussianEvent; refused when it would pass `target`."""
        check_positive("central_sigma", sigma)
        check_positive("central_queries", queries, integer=True)
        check_positive("central_batch", batch, integer=True)
        q = central_sample_rate(dataset_size, batch)
        event = PoissonGaussianEvent(stage="pretrain", noise_multiplier=float(sigma), sample_rate=q,
                                     steps=int(queries), note="dp-feta: central images (noisy class means)")
        after = compose_epsilon([*spent, event], delta)
        if target is not None and after.upper > target:
            raise _central_refusal(event, spent, delta, float(target))
        return PrivatePlan(events=(event,), settings={"central_sigma": float(sigma), "central_queries": int(queries),
                                                      "central_sample_rate": q, "dataset_size": dataset_size})

    def release_warmup(self, images, labels, num_classes: int, *, plan: PrivatePlan):
        """Run exactly the planned release (already in the ledger): the noisy central images."""
        s = plan.settings
        return noisy_central_images(images, labels, num_classes, noise_multiplier=s["central_sigma"],
                                    sample_rate=s["central_sample_rate"], queries=s["central_queries"],
                                    dataset_size=s["dataset_size"])


for _cls in (DPDM, PDPDiffusion, PrivImage, DPFETA):
    register_method(_cls)


def _central_refusal(event: PoissonGaussianEvent, spent: list, delta: float, target: float):
    """The central images would pass the run's target (set by an earlier finetune): the least
    `central_sigma` that fits it, or a new run, where pretrain comes before finetune's target."""
    needed = smallest_sigma(lambda s: epsilon_upper([*spent, replace(event, noise_multiplier=s)], delta), target,
                            event.noise_multiplier, 1e4)
    what = (f"its central images ({event.steps} queries at sample rate {event.sample_rate:.4g}, "
            f"`central_sigma` {event.noise_multiplier:g})")
    shortfall = Shortfall(stage="pretrain", target=target, delta=delta, spent=tuple(spent), planned=(event,),
                          what=what, param=None)
    return budget_refusal(shortfall, [
        f"in this run: pretrain `central_sigma` {round_up(needed):g} or more (the least noise that fits)"
        if needed is not None else None,
        "or, in a new `run` directory, pretrain first, then finetune with the `eps` you want: its calibration "
        "leaves room for the central images"])
