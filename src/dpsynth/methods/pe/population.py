"""PE's released model: the final population, labelled by its private class block.

The population is computed from the noisy histograms only (post-processing of the DP
releases), so it may be stored as the run's generator artifact. `generate` samples from it:
each class's images in a random order (from generate's --seed), without repeats until that
class's images are used up, then in a new order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class PopulationConfig:
    resolution: int
    channels: int
    num_classes: int
    population_per_class: int  # the key that tells a population's config from the API's

    def to_dict(self) -> dict:
        return asdict(self)


class Population(nn.Module):
    def __init__(self, cfg: PopulationConfig, images: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        n = cfg.num_classes * cfg.population_per_class
        shape = (n, cfg.channels, cfg.resolution, cfg.resolution)
        if images is not None and (images.dtype != torch.uint8 or tuple(images.shape) != shape):
            raise ValueError(f"population images {images.dtype} {tuple(images.shape)} must be uint8 {shape}")
        self.register_buffer("images", images.clone() if images is not None else torch.zeros(shape, dtype=torch.uint8))
        self.register_buffer("labels", torch.arange(cfg.num_classes).repeat_interleave(cfg.population_per_class))
        self._orders: dict[int, tuple] = {}  # class -> (its order, how many used)

    def _next(self, c: int, generator: torch.Generator | None) -> int:
        order, used = self._orders.get(c, (None, 0))
        if order is None or used == len(order):
            block = torch.nonzero(self.labels == c).flatten()
            order, used = block[torch.randperm(len(block), generator=generator)].tolist(), 0
        self._orders[c] = (order, used + 1)
        return order[used]

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 images of the requested classes, drawn from the population (module docstring)."""
        picks = [self._next(int(c), generator) for c in labels.cpu()]
        return self.images[torch.tensor(picks, dtype=torch.long)].cpu()
