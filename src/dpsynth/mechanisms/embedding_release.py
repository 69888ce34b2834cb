"""The one mechanism of the mean-embedding family: a noisy SUM of labelled embeddings.

Each sensitive example (x, y) contributes the vector
    v(x, y) = [ alpha * phi(x) (x) e_y ,  beta * e_y ]          (K*D + K coordinates)
with phi from features.py (||phi(x)|| <= 1), e_y the one-hot label, and alpha^2 + beta^2 <= 1
(`weights`), so ||v(x, y)||^2 = alpha^2 ||phi(x)||^2 + beta^2 <= 1. The second part counts the
classes, so class proportions come out of the same release (CelebA is imbalanced) at no extra cost.

Sensitivity: adding or removing one example changes S = sum_i v(x_i, y_i) by exactly that
example's v, so by at most 1 in L2. Releasing S + N(0, sigma^2 I) is therefore the Gaussian
mechanism with noise multiplier sigma (a GaussianEvent over the whole set; for a Poisson batch,
one step of a PoissonGaussianEvent). The sum is released, not the mean: dividing by a count
would divide by private data; callers divide by the PUBLIC size N (or the expected batch q*N).
The empty set releases pure noise, as the accounted mechanism must.

A small margin (1 - 1e-6) on alpha and beta absorbs float32 rounding of ||phi|| = 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..validation import check_fraction

if TYPE_CHECKING:  # annotations only: importing the methods package here would be circular
    from ..methods.mean_embedding.features import FeatureMap

MARGIN = 1.0 - 1e-6


def weights(count_weight: float) -> tuple[float, float]:
    """(alpha, beta) with alpha^2 + beta^2 = MARGIN^2 < 1; beta = count_weight * MARGIN."""
    check_fraction("count_weight", count_weight)  # e.g. 0.1
    return math.sqrt(1.0 - count_weight ** 2) * MARGIN, count_weight * MARGIN


def flatten_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) or float in [0, 1] -> float32 (B, C*H*W) in [0, 1]."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    return x.reshape(len(x), -1)


@dataclass(frozen=True)
class NoisySum:
    """The release, rescaled (post-processing): `features` estimates sum_i phi(x_i) (x) e_{y_i}
    (K, D) and `counts` the class counts (K,)."""

    features: torch.Tensor
    counts: torch.Tensor


def exact_sum(feature_map: FeatureMap, images: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
              count_weight: float, chunk: int = 1000, device: torch.device | None = None,
              on_rows=None) -> torch.Tensor:
    """S = sum_i v(x_i, y_i) as one flat float64 vector (K*D + K), computed in chunks of `chunk`
    images (memory) over ALL rows given. `on_rows(n)` is told each chunk's size."""
    alpha, beta = weights(count_weight)
    device = device or torch.device("cpu")
    sums = torch.zeros(num_classes, feature_map.dim, dtype=torch.float64, device=device)
    counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
    with torch.no_grad():
        for start in range(0, len(images), chunk):
            x = flatten_images(images[start:start + chunk]).to(device)
            onehot = torch.nn.functional.one_hot(labels[start:start + chunk].long().to(device), num_classes)
            sums += feature_map.class_sums(x, onehot.float()).double()
            counts += onehot.sum(0).double()
            if on_rows is not None:
                on_rows(len(x))
    return torch.cat([alpha * sums.flatten(), beta * counts])


def gaussian_release(exact: torch.Tensor, noise_multiplier: float) -> torch.Tensor:
    """exact + N(0, noise_multiplier^2 I): std = noise_multiplier x the L2 sensitivity 1.
    Noise from the global RNG, which the finetune stage reseeds from OS entropy."""
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise AssertionError(f"noise multiplier {noise_multiplier!r} must be > 0")
    noise = torch.randn(exact.shape, dtype=torch.float64, device=exact.device)
    return exact + noise_multiplier * noise


def noisy_sum(feature_map: FeatureMap, images: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
              noise_multiplier: float, count_weight: float, chunk: int = 1000, device: torch.device | None = None,
              on_rows=None) -> NoisySum:
    """One Gaussian release of the labelled embedding sum, unpacked and rescaled."""
    released = gaussian_release(exact_sum(feature_map, images, labels, num_classes, count_weight=count_weight,
                                          chunk=chunk, device=device, on_rows=on_rows), noise_multiplier)
    alpha, beta = weights(count_weight)
    k, d = num_classes, feature_map.dim
    return NoisySum(features=(released[:k * d] / alpha).reshape(k, d).float(), counts=(released[k * d:] / beta).float())


def class_proportions(counts: torch.Tensor) -> torch.Tensor:
    """Noisy counts -> proportions (negative counts clamped to 0; uniform if none is positive)."""
    positive = counts.clamp(min=0.0)
    total = positive.sum()
    if total <= 0:
        return torch.full_like(counts, 1.0 / len(counts))
    return positive / total
