"""DP-FETA's central images: noisy per-class means of Poisson-sampled batches.

Each query draws a Poisson batch at rate q from the sensitive set and releases, for every
class c, the sum of the class-c members downsampled x0.5 plus Gaussian noise, divided by
the PUBLIC expected class count q*N/K (DP-FETA's code divides by the actual count, which
is itself private; see shared/research). A downsampled image with pixels in [0, 1] has L2
norm at most Delta = sqrt(C * H/2 * W/2). The classes are disjoint, so adding or removing
one image changes the vector of all class sums by at most Delta in L2: noise std
sigma * Delta makes each query one subsampled Gaussian mechanism with noise multiplier
sigma, and `queries` of them are one PoissonGaussianEvent(sigma, q, steps=queries).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import BadInput
from ..validation import check_positive
from .secret_noise import secret_generator


def central_sample_rate(dataset_size: int, batch_size: int = 6000) -> float:
    """DP-FETA's rate: 1 / number of Poisson batches of expected size `batch_size`."""
    if dataset_size < 1:
        raise BadInput(f"sensitive dataset is empty (size {dataset_size})")
    return 1.0 / math.ceil(dataset_size / min(batch_size, dataset_size))


def l2_sensitivity(channels: int, height: int, width: int) -> float:
    return math.sqrt(channels * (height // 2) * (width // 2))


def _median_blur3(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    patches = F.unfold(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel_size=3)
    return patches.reshape(n, c, 9, h * w).median(dim=2).values.reshape(n, c, h, w)


def noisy_class_means(images: torch.Tensor, row_of: torch.Tensor, rows: int, *, noise_multiplier: float,
                      sample_rate: float, generator: torch.Generator, dataset_size: int | None = None) -> torch.Tensor:
    """One query: (rows, C, H/2, W/2) noisy means of a Poisson batch, before any clamping.
    `dataset_size` is the declared N of the denominator (default: the true size, public by convention)."""
    n, c, h, w = images.shape
    chosen = torch.rand(n, generator=generator) < sample_rate
    x = F.interpolate(images[chosen].float() / 255.0, scale_factor=0.5, mode="nearest")
    sums = torch.zeros(rows, c, h // 2, w // 2).index_add_(0, row_of[chosen], x)
    noise = torch.randn(sums.shape, generator=generator) * noise_multiplier * l2_sensitivity(c, h, w)
    expected = sample_rate * (dataset_size or n) / rows  # public denominator: expected class count
    return (sums + noise) / max(expected, 1.0)


def noisy_central_images(images: torch.Tensor, labels: torch.Tensor | None, num_classes: int, *,
                         noise_multiplier: float, sample_rate: float, queries: int,
                         generator: torch.Generator | None = None,
                         dataset_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(queries * classes) uint8 central images and their labels. Sampling and noise use a
    generator seeded from OS entropy unless one is given (tests)."""
    # The plan (methods.diffusion.plan_warmup) checked the user's values; this guards the mechanism itself.
    check_positive("noise_multiplier", noise_multiplier)
    check_positive("queries", queries, integer=True)
    if generator is None:
        generator = secret_generator()
    n, c, h, w = images.shape
    rows = num_classes if labels is not None else 1
    row_of = labels.long() if labels is not None else torch.zeros(n, dtype=torch.long)
    out, out_labels = [], []
    for _ in range(queries):
        noisy = noisy_class_means(images, row_of, rows, noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                                  generator=generator, dataset_size=dataset_size)
        up = F.interpolate(noisy.clamp(0, 1), size=(h, w), mode="bilinear", align_corners=False)
        out.append(_median_blur3(up))  # post-processing of the release, as DP-FETA does
        out_labels.append(torch.arange(rows))
    images_out = (torch.cat(out).clamp(0, 1) * 255).round().to(torch.uint8)
    return images_out, torch.cat(out_labels)
