"""dp-merf, dp-ntk and dp-kernel: a generator trained to match a noisy mean embedding.

Shared mechanism (release.py): the sum over examples of v(x, y) = [alpha phi(x) (x) e_y, beta e_y],
||v|| <= 1, plus N(0, sigma^2 I). What differs:
- dp-merf: phi = random Fourier features (one bandwidth); ONE release over all N images
  (GaussianEvent), then `epochs` passes of ceil(N / batch_size) Adam steps on the generator,
  post-processing of the release (DP-MERF, Harder et al. 2021).
- dp-ntk: phi = normalised NTK features of a small random MLP; ONE release over all N images.
  DPImageBench's calc_mean_emb1 breaks after its first data batch, so it embeds 5,000 of
  60,000 images (and still divides by that batch's size); here every image is embedded.
- dp-kernel: phi = RFF at several bandwidths (a mixture of RBF kernels). Each of T iterations
  draws a Poisson batch at rate q = batch_size / N, releases its noisy sum divided by the
  public expected batch size q*N, and takes one generator step towards it: one
  PoissonGaussianEvent(sigma, q, T). Empty batches release noise too.

N is treated as public, as everywhere in the pipeline (DP-SGD's sample rate uses it).
Class proportions come from the count coordinates of the same release(s); the generator is
trained on balanced labels with each class's embedding weighted by its noisy proportion.
The random feature parameters are drawn from the global RNG (reseeded from OS entropy by the
stage); they do not depend on the data and are not saved (only the generator is).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from ...errors import BadInput
from ..base import Method, PrivatePlan, Trained
from ..registry import register_method
from ...privacy.calibration import calibrate_sigma
from ...privacy.plans import gaussian_release_sigma
from ...privacy.events import GaussianEvent, PoissonGaussianEvent
from .features import FeatureMap, NTKFeatures, RandomFourierFeatures
from .generator import EmbeddingGenerator, EmbeddingGeneratorConfig
from ...mechanisms.embedding_release import NoisySum, class_proportions, flatten_images, noisy_sum, weights
from ...training.checkpoint import capture_state, restore_model_and_optimizer, restore_rng

STAGE = "finetune"
SENSITIVITY_NOTE = "L2 sensitivity 1: each image adds (a*phi(x) (x) onehot(y), b*onehot(y)), a^2+b^2<1, ||phi||<=1"


def _positive_int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BadInput(f"`train_opts` {name}={value!r} must be an integer >= 1")
    return value


def _positive_float(name: str, value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise BadInput(f"`train_opts` {name}={value!r} must be a number > 0")
    return float(value)


def _even_features(value: Any) -> int:
    if _positive_int("features", value) % 2:
        raise BadInput(f"`train_opts` features={value!r} must be even (cos and sin pairs)")
    return value


def _bandwidths(value: Any) -> list[float]:
    values = value if isinstance(value, (list, tuple)) else [value]
    return [_positive_float("bandwidths", v) for v in values]


class MeanEmbeddingMethod(Method):
    """Base: settings checks, the generator and its training step."""

    own_mechanism: ClassVar[bool] = True
    # dp-merf/dp-ntk: batch_size and epochs only shape the generator's fit to one release over all
    # N; dp-kernel counts its own iterations. Neither is a DP-SGD schedule: defaults left as they are.
    adapts_to_size: ClassVar[bool] = False
    config_class, model_class = EmbeddingGeneratorConfig, EmbeddingGenerator
    # Generator training only: no DP-SGD option (clip, grad_sample_mode, ...) exists here.
    finetune_defaults: ClassVar[dict[str, Any]] = {"epochs": 5, "batch_size": 100, "lr": 1e-2, "train_opts": {}}

    @staticmethod
    def per_sample_loss(model, x, y):
        raise BadInput("mean-embedding methods have no per-sample loss; they train on a noisy embedding")

    def check_generator(self, generator, **_shape_and_opts) -> None:
        return None  # the generator never sees sensitive data, only the noisy embedding

    def check_opts(self, opts) -> dict:
        """Validated train_opts (the stage already checked epochs, batch_size, lr)."""
        t = dict(opts.train_opts)
        weights(t["count_weight"])  # raises BadInput when out of (0, 1)
        lr_decay = _positive_float("lr_decay", t["lr_decay"])
        if lr_decay > 1:
            raise BadInput(f"`train_opts` lr_decay={lr_decay!r} must be in (0, 1] (1: constant learning rate)")
        return t

    def feature_map(self, input_dim: int, train_opts: dict) -> FeatureMap:
        raise NotImplementedError

    # ---- generator training (post-processing of the releases) -------------------------------
    @staticmethod
    def generator_step(generator: EmbeddingGenerator, optimizer, feature_map: FeatureMap, target: torch.Tensor,
                       proportions: torch.Tensor, batch_size: int, offset: int) -> float:
        """One Adam step on sum_k ||target_k - p_k * mean_k phi(G(z, k))||^2. Labels are balanced
        (rotated by `offset` so batches smaller than K still visit every class)."""
        k = generator.cfg.num_classes
        device = target.device
        labels = (torch.arange(batch_size, device=device) + offset) % k
        x = flatten_images(generator(generator.latent(batch_size, device=device), labels))
        per_class = torch.bincount(labels, minlength=k).clamp(min=1).to(x.dtype)
        w = torch.nn.functional.one_hot(labels, k).to(x.dtype) * (proportions / per_class)[None, :]
        loss = ((target - feature_map.class_sums(x, w)) ** 2).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())


class SingleReleaseMethod(MeanEmbeddingMethod):
    """dp-merf and dp-ntk: one Gaussian release over the whole set, then generator training
    (not iterative: nothing to checkpoint or resume)."""

    iterative: ClassVar[bool] = False

    def plan_private(self, *, dataset_size: int, opts: dict, spent: list, eps: float, delta: float) -> PrivatePlan:
        self.check_opts(opts)
        if dataset_size < 1:
            raise BadInput(f"sensitive dataset is empty (size {dataset_size})")
        sigma = gaussian_release_sigma(spent, eps, delta, stage=STAGE, what="its one embedding release")
        event = GaussianEvent(stage=STAGE, noise_multiplier=sigma,
                              note=f"{self.name}: one release of the embedding sum over all images; {SENSITIVITY_NOTE}")
        steps = opts.epochs * math.ceil(dataset_size / opts.batch_size)
        return PrivatePlan(events=(event,), settings={"noise_multiplier": sigma, "releases": 1,
                                                      "dataset_size": dataset_size,
                                                      "generator_steps": steps, "l2_sensitivity": 1.0})

    def train_private(self, generator, images, labels, *, opts, plan, device, progress, checkpoints=None):
        t = self.check_opts(opts)
        n, k = len(images), generator.cfg.num_classes
        fmap = self.feature_map(images[0].numel(), t).to(device)
        rows = [0]

        def on_rows(count: int) -> None:
            rows[0] += count
            progress(f"finetune ({self.name}): embedding", rows[0], n)

        release = noisy_sum(fmap, images, labels, k, noise_multiplier=plan.settings["noise_multiplier"],
                            count_weight=t["count_weight"], device=device, on_rows=on_rows)
        if rows[0] != n:  # the accounted mechanism embeds every image
            raise AssertionError(f"embedded {rows[0]} of {n} images")
        # public (declared) N, never the true size
        fit_to_release(generator, fmap, release, plan.settings["dataset_size"], epochs=opts.epochs,
                       batch_size=opts.batch_size, lr=opts.lr, lr_decay=t["lr_decay"], device=device,
                       progress=progress, phase=f"finetune ({self.name}): generator")
        return Trained(generator.eval())


def fit_to_release(generator: EmbeddingGenerator, feature_map: FeatureMap, release: NoisySum, declared_size: int, *,
                   epochs: int, batch_size: int, lr: float, lr_decay: float, device: torch.device,
                   progress, phase: str) -> EmbeddingGenerator:
    """Post-processing of ONE release over all `declared_size` images (dp-merf, dp-ntk, FETA-Pro's
    auxiliary generator): `epochs` passes of ceil(N / batch_size) Adam steps towards the noisy
    mean embedding (the sum divided by the PUBLIC N), the learning rate times `lr_decay` per pass."""
    target = release.features.to(device) / declared_size  # the noisy mean joint embedding
    proportions = class_proportions(release.counts).to(device)
    steps_per_epoch = math.ceil(declared_size / batch_size)
    total = epochs * steps_per_epoch
    generator.train()
    optimizer = torch.optim.Adam(generator.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=steps_per_epoch, gamma=lr_decay)
    for step in range(total):
        loss = MeanEmbeddingMethod.generator_step(generator, optimizer, feature_map, target, proportions, batch_size,
                                                  step)
        schedule.step()
        progress(phase, step + 1, total, loss)
    return generator.eval()


class DPMERF(SingleReleaseMethod):
    name = "dp-merf"
    description = "DP-MERF: one noisy random-Fourier-feature mean embedding, then a generator matches it"
    # DPImageBench configs/DP-MERF/fmnist_28_eps10.0.yaml: d_rff 10000, rff_sigma 105 (the variance of
    # the frequencies' inverse: bandwidth sqrt(105)), 5 epochs of batch 100, lr 0.01, decay 0.9 per epoch.
    finetune_defaults = {"epochs": 5, "batch_size": 100, "lr": 1e-2,
                         "train_opts": {"features": 10000, "bandwidth": 10.25, "count_weight": 0.1, "lr_decay": 0.9}}

    def check_opts(self, opts):
        t = super().check_opts(opts)
        _even_features(t["features"])
        _bandwidths(t["bandwidth"])
        return t

    def feature_map(self, input_dim, train_opts):
        return RandomFourierFeatures(input_dim, train_opts["features"], _bandwidths(train_opts["bandwidth"]))


class DPNTK(SingleReleaseMethod):
    name = "dp-ntk"
    description = "DP-NTK: one noisy neural-tangent-kernel mean embedding over all images, then a generator"
    # DPImageBench configs/DP-NTK/fmnist_28_eps10.0.yaml: fc_2l NTK 32/256, 2000 iterations of batch
    # 5000 (167 epochs of 12 steps at N = 60,000), lr 0.01.
    finetune_defaults = {"epochs": 20, "batch_size": 1000, "lr": 1e-2,
                         "train_opts": {"ntk_width": 32, "ntk_width2": 256, "count_weight": 0.1, "lr_decay": 1.0}}

    def check_opts(self, opts):
        t = super().check_opts(opts)
        _positive_int("ntk_width", t["ntk_width"])
        _positive_int("ntk_width2", t["ntk_width2"])
        return t

    def feature_map(self, input_dim, train_opts):
        return NTKFeatures(input_dim, train_opts["ntk_width"], train_opts["ntk_width2"])


class DPKernel(MeanEmbeddingMethod):
    name = "dp-kernel"
    description = "DP-Kernel: per-iteration noisy multi-bandwidth RBF kernel embeddings of Poisson batches"
    # CPU-sized defaults; DPImageBench's (batch 60, 200,002 iterations) are in recipes/dp-kernel/.
    # Bandwidths: DPImageBench's sigma_list [1, 2, 4, 8, 16] on [-1, 1] pixels at 32x32 ~ x0.44 on
    # [0, 1] pixels at 28x28 (half the scale, sqrt(784/1024) of the distance).
    finetune_defaults = {"epochs": 1, "batch_size": 60, "lr": 1e-3,
                         "train_opts": {"features": 1000, "bandwidths": [0.44, 0.88, 1.75, 3.5, 7.0],
                                        "count_weight": 0.1, "lr_decay": 1.0, "generator_batch": None}}

    def check_opts(self, opts):
        t = super().check_opts(opts)
        _even_features(t["features"])
        _bandwidths(t["bandwidths"])
        if t["generator_batch"] is not None:
            _positive_int("generator_batch", t["generator_batch"])
        return t

    def feature_map(self, input_dim, train_opts):
        return RandomFourierFeatures(input_dim, train_opts["features"], _bandwidths(train_opts["bandwidths"]))

    def plan_private(self, *, dataset_size: int, opts: dict, spent: list, eps: float, delta: float) -> PrivatePlan:
        self.check_opts(opts)
        if not (1 <= opts.batch_size <= dataset_size):
            raise BadInput(f"batch_size={opts.batch_size} must be between 1 and the dataset size {dataset_size}")
        rate = opts.batch_size / dataset_size
        iterations = math.ceil(opts.epochs * dataset_size / opts.batch_size)

        def events_at(sigma: float) -> list:
            return [PoissonGaussianEvent(stage=STAGE, noise_multiplier=sigma, sample_rate=rate, steps=iterations,
                                         note=f"dp-kernel: embedding sum of each Poisson batch; {SENSITIVITY_NOTE}")]

        sigma = calibrate_sigma(spent, eps, delta, events_at, sigma_min=0.4, sigma_max=200.0,
                                what=f"its {iterations} releases at sample rate {rate:.4g}",
                                advice="use fewer `epochs` or a smaller `batch_size`")
        (event,) = events_at(sigma)
        return PrivatePlan(events=(event,), settings={"noise_multiplier": sigma, "sample_rate": rate,
                                                      "dataset_size": dataset_size,
                                                      "releases": iterations, "generator_steps": iterations,
                                                      "l2_sensitivity": 1.0})

    def private_steps(self, plan: PrivatePlan) -> int:
        return int(plan.settings["releases"])

    def train_private(self, generator, images, labels, *, opts, plan, device, progress, checkpoints=None):
        """One noisy release and one generator step per iteration. Checkpoints hold the
        generator, its optimizer and schedule, the running class counts (post-processing of
        the releases so far), the random features and the RNG."""
        t = self.check_opts(opts)
        n, k = len(images), generator.cfg.num_classes
        rate, iterations = plan.settings["sample_rate"], plan.settings["releases"]
        expected = rate * plan.settings["dataset_size"]  # public denominator (the actual batch size is private)
        fmap = self.feature_map(images[0].numel(), t).to(device)
        gen_batch = t["generator_batch"] or opts.batch_size
        generator.train()
        optimizer = torch.optim.Adam(generator.parameters(), lr=opts.lr)
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, round(1 / rate)), gamma=t["lr_decay"])
        counts = torch.zeros(k)
        resume = getattr(checkpoints, "resume", None)
        start = 0
        if resume:
            start = restore_model_and_optimizer(resume, generator, optimizer)
            schedule.load_state_dict(resume["extra"]["schedule"])
            counts = resume["extra"]["counts"].clone()
            for name, value in resume["extra"]["features"].items():
                setattr(fmap, name, value.to(device))
            restore_rng(resume)  # last: the next draw is the first resumed release's
        features = {name: v for name, v in vars(fmap).items() if isinstance(v, torch.Tensor)}
        for step in range(start, iterations):  # exactly the planned number of releases
            chosen = torch.nonzero(torch.rand(n) < rate).flatten()  # Poisson sampling, global (secret) RNG
            release = noisy_sum(fmap, images[chosen], labels[chosen], k, noise_multiplier=plan.settings["noise_multiplier"],
                                count_weight=t["count_weight"], device=device)
            counts += release.counts.cpu()  # the proportions: running post-processing of all releases so far
            loss = self.generator_step(generator, optimizer, fmap, release.features.to(device) / expected,
                                       class_proportions(counts).to(device), gen_batch, step)
            schedule.step()
            progress("finetune (dp-kernel)", step + 1, iterations, loss)
            if checkpoints is not None:
                checkpoints(step + 1, lambda: capture_state(step + 1, generator, optimizer, schedule=schedule,
                                                            counts=counts, features=features))
        return Trained(generator.eval())


for _cls in (DPMERF, DPNTK, DPKernel):
    register_method(_cls)
