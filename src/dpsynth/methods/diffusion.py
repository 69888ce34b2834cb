"""The EDM diffusion methods: DPDM, PDP-Diffusion, PrivImage, DP-FETA."""

from __future__ import annotations

from ..errors import BudgetExhausted
from ..mechanisms.central_images import central_sample_rate, noisy_central_images
from ..models.edm import EDMConfig, EDMDiffusion
from ..privacy.accountant import compose_epsilon
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
            raise BudgetExhausted(f"central images (central_sigma={sigma}) would bring epsilon to {after.upper:.3f}, "
                                  f"over the run's target {target}; raise central_sigma")
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
