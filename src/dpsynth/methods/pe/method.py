"""PE, Private Evolution (Lin et al., ICLR 2024), as DPImageBench runs it (models/pe.py `PE.train`;
microsoft/DPSDA pe/runner/pe.py), on a generation API (api.py) that never sees sensitive data.

    embed the sensitive images once in the run's feature network (Inception-v3 when clean-fid's
        weights are on disk, else the public-only query network: the network evaluate names)
    population := API.random(P per class, a uniform public handle each); block c = private class c
    for t = 1..T:
        candidate features := features of the population (lookahead L > 0: the mean features of
            L variations of each candidate at degree_t; the candidate itself is unchanged)
        counts := DP nearest-neighbour histogram (mechanisms/pe_histogram.py): each sensitive
            image of class c votes for its k nearest candidates of block c, + N(0, (sigma sqrt k)^2)
        weights := max(counts - H, 0); parents := P per class, with replacement, prop. to weights
        population := API.variation(parents, their handles, degree_t)   (parents are dropped)
    release: the final population, labelled by block (population.py) -- what `generate` samples.

Privacy: one Gaussian release per iteration (noise multiplier sigma w.r.t. the L2 sensitivity
sqrt(k); the classes are disjoint, so the whole vector is one release): T `gaussian` events,
sigma calibrated so the ledger stays <= eps. All T are written before the first histogram
exists; a crash after iteration t leaves T >= t events (over-counting, never under-). N is
not used (the class blocks have the public size P). Each iteration is checkpointed (population,
handles, RNG states), so `finetune --resume` continues under the same events.

The stage pretrains the default API (dpsynth's EDM on the public set); with `api=MODULE:FACTORY`
the pretrained model is not used (its stage must still have run: `pretrain --epochs 1` suffices).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch

from ...errors import BadInput
from ...mechanisms.pe_histogram import add_noise, l2_sensitivity, nearest_neighbour_votes, resample, threshold
from ...mechanisms.secret_noise import secret_generator
from ...models.edm import EDMConfig, EDMDiffusion
from ...privacy.calibration import calibrate_sigma
from ...privacy.events import GaussianEvent
from ..base import Method, PrivatePlan, Trained
from ..registry import register_method
from .api import EDMGenerationAPI, GenerationAPI, checked_images, external_api, factory_from_spec
from .population import Population, PopulationConfig

STAGE = "finetune"

# DPImageBench's 28 px PE schedule (configs/PE/fmnist_28_eps10.0.yaml: degrees 0,0,0,1,1,1,1,2,2,2,2 at
# DDIM respacing 10) as start noise levels of our EDM API: index 0 regenerates all but the label
# (sigma_max), 1 and 2 are sqrt((1 - abar) / abar) = 5.7 and 2.8 under the cosine schedule
# (shared/research/methods-pe-ldm-lora-feta-ddp.md, section 1).
FMNIST_DEGREES = [80.0, 80.0, 80.0, 5.7, 5.7, 5.7, 5.7, 2.8, 2.8, 2.8, 2.8]


def _int(name: str, value: Any, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise BadInput(f"`train_opts` {name}={value!r} must be an integer >= {low}")
    return value


def _number(name: str, value: Any, *, zero_ok: bool) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or \
            (value < 0 if zero_ok else value <= 0):
        raise BadInput(f"`train_opts` {name}={value!r} must be a number {'>= 0' if zero_ok else '> 0'}")
    return float(value)


class PrivateEvolution(Method):
    name = "pe"
    description = "PE (Private Evolution): DP nearest-neighbour votes select and vary a public-pretrained model's samples"
    uses_pretraining = True          # the default API: dpsynth's EDM, pretrained on the public set
    uses_feature_network = True      # the finetune stage hands it the run's named feature network
    own_mechanism = True
    adapts_to_size = False  # no batch_size or epochs: its population is public-sized
    config_class, model_class = EDMConfig, EDMDiffusion  # what `pretrain` trains (the default API)
    pretrain_defaults = {"epochs": 25, "batch_size": 64, "lr": 3e-4}
    # CPU-sized defaults (DPImageBench: 6,000 per class, lookahead 8); recipes/pe/ has its settings.
    finetune_defaults: ClassVar[dict[str, Any]] = {"train_opts": {
        "variation_degrees": FMNIST_DEGREES, "population_per_class": 200, "threshold": 3.0, "nn_k": 1,
        "lookahead": 1, "sample_steps": 10, "api": None, "api_batch": 256}}

    def settings(self, opts) -> dict:
        """Validated train_opts; the API module is imported here (before any event is written)."""
        t = dict(opts.train_opts)
        degrees = t["variation_degrees"]
        degrees = degrees if isinstance(degrees, (list, tuple)) else [degrees]
        if not degrees:
            raise BadInput("`train_opts` variation_degrees=[] must list one degree per iteration")
        t["variation_degrees"] = [_number("variation_degrees", d, zero_ok=False) for d in degrees]
        for name in ("population_per_class", "nn_k", "sample_steps", "api_batch"):
            _int(name, t[name], 2 if name == "sample_steps" else 1)
        _int("lookahead", t["lookahead"], 0)
        t["threshold"] = _number("threshold", t["threshold"], zero_ok=True)
        if t["nn_k"] > t["population_per_class"]:
            raise BadInput(f"`train_opts` nn_k={t['nn_k']} exceeds population_per_class={t['population_per_class']}")
        if t["api"] is not None:
            factory_from_spec(t["api"])
        return t

    # ---- stages -------------------------------------------------------------------------------
    def generator_from_config(self, config: dict):
        """The API (pretrain's output) or the released population (finetune's), by its config."""
        if "population_per_class" in config:
            return Population(PopulationConfig(**config))
        return super().generator_from_config(config)

    def check_generator(self, generator, **_shape_and_opts) -> None:
        return None  # the API never sees sensitive data; only its samples are compared with it

    def plan_private(self, *, dataset_size: int, opts, spent: list, eps: float, delta: float) -> PrivatePlan:
        t = self.settings(opts)
        iterations, k = len(t["variation_degrees"]), t["nn_k"]
        note = (f"pe: DP nearest-neighbour histogram, iteration {{}} of {iterations}: each sensitive image votes for "
                f"its {k} nearest candidates of its own class (L2 sensitivity sqrt({k}); classes disjoint: one release)")

        def events_at(sigma: float) -> list:
            return [GaussianEvent(stage=STAGE, noise_multiplier=sigma, note=note.format(i))
                    for i in range(1, iterations + 1)]

        sigma = calibrate_sigma(spent, eps, delta, events_at, sigma_min=0.05, sigma_max=500.0,
                                what=f"its {iterations} histogram releases",
                                advice="use fewer `variation_degrees` (iterations) in `train_opts`")
        return PrivatePlan(events=tuple(events_at(sigma)), settings={
            "noise_multiplier": sigma, "iterations": iterations, "nn_k": k, "l2_sensitivity": l2_sensitivity(k),
            "noise_std": sigma * l2_sensitivity(k), "threshold": t["threshold"],
            "population_per_class": t["population_per_class"], "dataset_size": dataset_size})

    def private_steps(self, plan: PrivatePlan) -> int:
        return int(plan.settings["iterations"])

    def train_private(self, generator, images, labels, *, opts, plan, device, progress, checkpoints=None) -> Trained:
        t, s = self.settings(opts), plan.settings
        if t["population_per_class"] != s["population_per_class"] or len(t["variation_degrees"]) != s["iterations"]:
            raise RuntimeError("PE settings differ from the planned events")
        features = getattr(self, "feature_network", None)
        if features is None:
            raise RuntimeError("PE needs the run's feature network (the finetune stage sets `feature_network`)")
        k_classes, per_class = generator.cfg.num_classes, t["population_per_class"]
        _, c, r, _ = images.shape
        shape = (c, r, r)
        api_rng = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 62, (1,))))  # global RNG: OS entropy
        if t["api"] is None:
            api: GenerationAPI = EDMGenerationAPI(generator, steps=t["sample_steps"], device=device,
                                                  batch_size=t["api_batch"], generator=api_rng)
        else:
            api = external_api(t["api"], resolution=r, channels=c, num_classes=k_classes, device=device)
        noise_rng = secret_generator()  # the histogram noise and the resampling

        def embed(batch: torch.Tensor) -> torch.Tensor:
            from ...evaluation.fidelity import extract_features
            return torch.from_numpy(np.asarray(extract_features(batch, features, device=device,
                                                                batch_size=t["api_batch"]))).float()

        progress("finetune (pe): embedding the sensitive set", 0, 1)
        private = embed(images)
        progress("finetune (pe): embedding the sensitive set", 1, 1)
        blocks = torch.arange(k_classes).repeat_interleave(per_class)
        resume = getattr(checkpoints, "resume", None)
        if resume:
            start = int(resume["step"])
            population, handles = resume["extra"]["population"].clone(), resume["extra"]["handles"].clone()
            noise_rng.set_state(resume["extra"]["noise_rng"])
            api_rng.set_state(resume["extra"]["api_rng"])
        else:
            start = 0
            handles = torch.randint(0, api.num_labels, (len(blocks),))
            progress("finetune (pe): initial population", 0, 1)
            population = checked_images(api.random(handles), len(blocks), shape, "random")
        iterations = s["iterations"]
        for it in range(start, iterations):
            degree = t["variation_degrees"][it]
            phase = f"finetune (pe): iteration {it + 1}/{iterations}"
            if t["lookahead"]:
                candidates = sum(embed(checked_images(api.variation(population, handles, degree), len(blocks),
                                                      shape, "variation")) for _ in range(t["lookahead"]))
                candidates = candidates / t["lookahead"]
            else:
                candidates = embed(population)
            votes = nearest_neighbour_votes(private, labels, candidates, blocks, t["nn_k"], k_classes)
            noisy = add_noise(votes, s["noise_multiplier"], t["nn_k"], noise_rng)  # the release
            del votes  # the exact counts never leave this loop
            parents, _fallbacks = resample(threshold(noisy, t["threshold"]), noisy, blocks, per_class, k_classes,
                                           noise_rng)
            handles = handles[parents]
            population = checked_images(api.variation(population[parents], handles, degree), len(blocks), shape,
                                        "variation")
            progress(phase, it + 1, iterations)
            if checkpoints is not None:  # the RNG states are as secret as the noise (checkpoints are deleted)
                state = {"step": it + 1, "extra": {"population": population, "handles": handles,
                                                   "noise_rng": noise_rng.get_state(), "api_rng": api_rng.get_state()}}
                checkpoints(it + 1, lambda: state)
        cfg = PopulationConfig(resolution=r, channels=c, num_classes=k_classes, population_per_class=per_class)
        return Trained(Population(cfg, population))


register_method(PrivateEvolution)
