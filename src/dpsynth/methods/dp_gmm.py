"""dp-gmm: a class-conditional Gaussian mixture fitted by noisy moments (dpsynth's own method).

Not a DPImageBench method. It follows DP-EM (Park, Foulds, Chaudhuri & Welling, AISTATS 2017:
mixture models fitted from Gaussian-perturbed moments) with DP Lloyd iterations (SuLQ k-means,
Blum et al. 2005) for the components. Every read of the sensitive set is one Gaussian release of
per-cell moment sums of L2 sensitivity 1 (mechanisms/moment_release.py), 2 + `lloyd_iterations`
releases in all, one GaussianEvent each, all of the same noise multiplier:
1. class moments: per class, sum x x^T, sum x and the count (x clipped to ||x|| <= clip sqrt(D)).
   Post-processing: each class's mean and top principal directions, and `components` starting
   centroids drawn from that Gaussian (global RNG, reseeded from OS entropy by the stage).
2. `lloyd_iterations` Lloyd steps: each row goes to the nearest centroid of its own class; one
   release of every (class, component) cell's sum of x and count; the centroids become the noisy
   means (a cell whose noisy count is below 1 keeps its centroid).
3. component moments: rows assigned by the final centroids, centred on their centroid and clipped
   to ||x - c|| <= centred_clip sqrt(D) (centring shrinks the bound, hence the noise, ~2.4x on
   Fashion-MNIST); one release of every cell's second moments. Post-processing: each component's
   weight (noisy count), mean and covariance (GaussianMixture.set_component: top `rank`
   directions plus an isotropic residual from the unbiased leftover trace).
The assignment rule depends only on the row, its label and earlier releases, so each row lands in
exactly one cell of each release. N is public (declared), as everywhere in the pipeline.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from ..errors import BadInput
from ..mechanisms.embedding_release import flatten_images
from ..mechanisms.moment_release import clip_rows, first_moments, second_moments
from ..models.gaussian_mixture import GaussianMixture, GaussianMixtureConfig
from ..privacy.calibration import calibrate_sigma
from ..privacy.events import GaussianEvent
from .base import Method, PrivatePlan, Trained
from .registry import register_method

STAGE = "finetune"
SENSITIVITY = "L2 sensitivity 1: each image adds one cell's (a vec(xx^T)/B^2, b x/B, c) or (b x/B, c), norm <= 1"


def checked_fit_settings(given: dict, where: str = "`train_opts`") -> dict:
    """`lloyd_iterations`, `clip` and `centred_clip` of `given`, checked; errors name `where`."""
    t = dict(given)
    lloyd = t["lloyd_iterations"]
    if not isinstance(lloyd, int) or isinstance(lloyd, bool) or lloyd < 0:
        raise BadInput(f"{where} lloyd_iterations={lloyd!r} must be an integer >= 0")
    for name in ("clip", "centred_clip"):
        value = t[name]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 1:
            raise BadInput(f"{where} {name}={value!r} must be a number in (0, 1] (a share of sqrt(pixels))")
        t[name] = float(value)
    return t


class DPGMM(Method):
    name = "dp-gmm"
    description = "DP-GMM: per-class Gaussian mixtures from noisy moments (DP Lloyd, then per-component covariances)"
    own_mechanism = True
    iterative = False        # a few full-data releases, seconds each: nothing to checkpoint
    adapts_to_size = False   # no batch or epochs: every release reads all N
    config_class, model_class = GaussianMixtureConfig, GaussianMixture
    # Measured on Fashion-MNIST at eps 10 (docs/DECISIONS.md, "dp-gmm"): 8 components of rank 10,
    # 3 Lloyd steps; clips 0.5 sqrt(D) (14 of the 28 an all-white image has) and 0.32 sqrt(D) centred.
    finetune_defaults: ClassVar[dict[str, Any]] = {"train_opts": {
        "lloyd_iterations": 3, "clip": 0.5, "centred_clip": 0.32}}

    def settings(self, opts) -> dict:
        return checked_fit_settings(opts.train_opts)

    def check_generator(self, generator, **_shape_and_opts) -> None:
        return None  # a set of buffers filled from the releases: it never sees sensitive data

    def plan_private(self, *, dataset_size: int, opts, spent: list, eps: float, delta: float) -> PrivatePlan:
        t = self.settings(opts)
        if dataset_size < 1:
            raise BadInput(f"sensitive dataset is empty (size {dataset_size})")
        names = release_names(t["lloyd_iterations"])

        def events_at(sigma: float) -> list:
            return [GaussianEvent(stage=STAGE, noise_multiplier=sigma, note=f"dp-gmm: {what}; {SENSITIVITY}")
                    for what in names]

        sigma = calibrate_sigma(spent, eps, delta, events_at, sigma_min=0.05, sigma_max=500.0,
                                what=f"its {len(names)} moment releases",
                                advice="use fewer `lloyd_iterations` in `train_opts`")
        return PrivatePlan(events=tuple(events_at(sigma)), settings={
            "noise_multiplier": sigma, "releases": len(names), "lloyd_iterations": t["lloyd_iterations"],
            "dataset_size": dataset_size, "l2_sensitivity": 1.0})

    def train_private(self, generator: GaussianMixture, images, labels, *, opts, plan, device, progress,
                      checkpoints=None) -> Trained:
        t, s = self.settings(opts), plan.settings
        if t["lloyd_iterations"] != s["lloyd_iterations"]:
            raise RuntimeError("dp-gmm settings differ from the planned events")
        fit_mixture(generator, images, labels, noise_multiplier=s["noise_multiplier"],
                    lloyd_iterations=t["lloyd_iterations"], clip=t["clip"], centred_clip=t["centred_clip"],
                    device=device, progress=progress, phase="finetune (dp-gmm): releases")
        return Trained(generator.eval())


def release_names(lloyd_iterations: int) -> list[str]:
    """What each of the 2 + `lloyd_iterations` releases is, in the order they run."""
    return (["class moments"] + [f"Lloyd step {i + 1} of {lloyd_iterations}" for i in range(lloyd_iterations)]
            + ["component moments"])


def fit_mixture(generator: GaussianMixture, images, labels, *, noise_multiplier: float, lloyd_iterations: int,
                clip: float, centred_clip: float, device, progress, phase: str) -> GaussianMixture:
    """Fill `generator` from the 2 + `lloyd_iterations` Gaussian releases (module docstring), each
    of L2 sensitivity 1 and noise multiplier `noise_multiplier`. The caller has written their
    events (`release_names`) to the ledger; everything after each release is post-processing."""
    sigma, releases = noise_multiplier, 2 + lloyd_iterations
    k, m, r = generator.cfg.num_classes, generator.cfg.components, generator.cfg.rank
    x = flatten_images(images).to(device)  # float32: the releases sum in float64 chunk by chunk
    y = labels.long().to(device)
    bound, centred_bound = clip * math.sqrt(x.shape[1]), centred_clip * math.sqrt(x.shape[1])
    x = clip_rows(x, bound)  # the releases clip too; assignments must see the same rows

    centroids = torch.empty(k, m, x.shape[1], dtype=torch.float64, device=device)
    for cell in second_moments(x, y, k, bound=bound, noise_multiplier=sigma):
        count = max(cell.count, 1.0)
        mean = cell.first / count
        values, vectors = torch.linalg.eigh(cell.second / count - torch.outer(mean, mean))
        spread = torch.randn(m, r, dtype=torch.float64, device=device) * values[-r:].clamp(min=0).sqrt()
        centroids[cell.cell] = mean + spread @ vectors[:, -r:].t()
    progress(phase, 1, releases)

    def assign() -> torch.Tensor:
        """(class, component) cell of each row: the nearest centroid of its own class."""
        nearest = torch.empty_like(y)
        for label in range(k):
            mine = y == label
            if mine.any():
                nearest[mine] = torch.cdist(x[mine], centroids[label].float()).argmin(1)
        return y * m + nearest

    for step in range(lloyd_iterations):
        released = first_moments(x, assign(), k * m, bound=bound, noise_multiplier=sigma)
        flat = centroids.view(k * m, -1)
        enough = released.counts >= 1.0
        flat[enough] = released.sums[enough] / released.counts[enough, None]
        progress(phase, 2 + step, releases)

    cells = assign()
    centred = clip_rows(x - centroids.view(k * m, -1).float()[cells], centred_bound)
    for cell in second_moments(centred, cells, k * m, bound=centred_bound, noise_multiplier=sigma):
        label, component = divmod(cell.cell, m)
        count = max(cell.count, 1.0)
        offset = cell.first / count
        generator.set_component(label, component, weight=cell.count, mean=centroids[label, component] + offset,
                                covariance=cell.second / count - torch.outer(offset, offset))
    progress(phase, releases, releases)
    return generator


register_method(DPGMM)
