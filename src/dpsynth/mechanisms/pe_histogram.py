"""PE's one mechanism: the DP nearest-neighbour histogram (Lin et al., ICLR 2024; DPImageBench
models/PE/pe/dp_counter.py `dp_nn_histogram`), as small functions over feature tensors.

Each sensitive image of class c votes +1 for each of its k nearest candidates (L2 in the
feature space) among the candidates of block c. Its k votes go to k DISTINCT candidates of one
block, so adding or removing one image changes the count vector by exactly k ones: by sqrt(k)
in L2. Adding N(0, (sigma * sqrt(k))^2) to every count is therefore the Gaussian mechanism with
noise multiplier sigma. The classes are disjoint, so one iteration's whole vector (every block)
is ONE release. Thresholding and resampling read only the noisy counts (post-processing).
"""

from __future__ import annotations

import math

import torch

from ..errors import BadInput
from .secret_noise import secret_generator


def nearest_neighbour_votes(private: torch.Tensor, private_labels: torch.Tensor, candidates: torch.Tensor,
                            candidate_labels: torch.Tensor, k: int, num_classes: int, chunk: int = 1024) -> torch.Tensor:
    """The exact (NOT private) counts: float64 (len(candidates),), each sensitive image's k votes
    added to its k nearest candidates of its own class. Only `add_noise`'s output may leave."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise BadInput(f"`train_opts` nn_k={k!r} must be an integer >= 1")
    private, candidates = private.float(), candidates.float()
    counts = torch.zeros(len(candidates), dtype=torch.float64)
    for c in range(num_classes):
        block = torch.nonzero(candidate_labels == c).flatten()
        voters = private[private_labels == c]
        if len(voters) == 0:
            continue
        if len(block) < k:
            raise BadInput(f"`train_opts` nn_k={k} exceeds the {len(block)} candidates of class {c}")
        pool = candidates[block]
        for start in range(0, len(voters), chunk):
            nearest = torch.cdist(voters[start:start + chunk], pool).topk(k, dim=1, largest=False).indices
            counts.index_add_(0, block[nearest.flatten()].cpu(), torch.ones(nearest.numel(), dtype=torch.float64))
    return counts


def l2_sensitivity(k: int) -> float:
    return math.sqrt(k)


def add_noise(counts: torch.Tensor, noise_multiplier: float, k: int,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """counts + N(0, (noise_multiplier * sqrt(k))^2) per count: the release. The default
    generator is seeded from OS entropy (never from the run's --seed)."""
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise AssertionError(f"noise multiplier {noise_multiplier!r} must be > 0")
    generator = generator if generator is not None else secret_generator()
    noise = torch.randn(counts.shape, generator=generator, dtype=torch.float64)
    return counts.double() + noise * (noise_multiplier * l2_sensitivity(k))


def threshold(noisy: torch.Tensor, h: float) -> torch.Tensor:
    """max(count - H, 0), as DPImageBench's dp_nn_histogram: counts that noise alone could
    reach are cut, the rest shifted down by H."""
    return (noisy - h).clamp(min=0.0)


def resample(weights: torch.Tensor, noisy: torch.Tensor, candidate_labels: torch.Tensor, per_class: int,
             num_classes: int, generator: torch.Generator) -> tuple[torch.Tensor, list[int]]:
    """Parents for the next population: `per_class` candidate indices per class, drawn with
    replacement with probability proportional to `weights` within the class block. A block
    whose weights are all 0 falls back to its noisy counts clipped at 0, then to uniform
    (DPImageBench would divide by 0 there). Returns (indices, classes that fell back)."""
    parents, fallbacks = [], []
    for c in range(num_classes):
        block = torch.nonzero(candidate_labels == c).flatten()
        w = weights[block].double()
        if not float(w.sum()) > 0:
            fallbacks.append(c)
            w = noisy[block].double().clamp(min=0.0)
            if not float(w.sum()) > 0:
                w = torch.ones(len(block), dtype=torch.float64)
        picks = torch.multinomial(w, per_class, replacement=True, generator=generator)
        parents.append(block[picks])
    return torch.cat(parents), fallbacks
