"""Improved precision and recall on k-NN feature manifolds (Kynkäänniemi et al., NeurIPS 2019).

Each set's manifold is the union of balls around its points, the radius of a
ball being the distance to that point's k-th nearest neighbour in the same set
(the point itself excluded). Precision = share of fake points inside the real
manifold; recall = share of real points inside the fake manifold. k = 4 is the
paper's default and DPImageBench's.

Distances are computed in row chunks with torch.cdist so 10k x 10k sets of
2048-d features never need the full N x M matrix at once. Tensors on a GPU
are computed there.
"""

from __future__ import annotations

import numpy as np
import torch

from dpsynth.errors import BadInput

# Rows per cdist block: 1024 x 10k float32 distances is ~40 MB.
CHUNK = 1024


def _as_features(name: str, x) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.ndim != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise BadInput(f"{name} must be a non-empty (N, D) feature array, got shape {tuple(t.shape)}")
    t = t.to(torch.float64) if t.dtype == torch.float64 else t.to(torch.float32)
    if not torch.isfinite(t).all():
        raise BadInput(f"{name} contains NaN or infinite values; features must be finite")
    return t


def knn_radii(features: torch.Tensor, k: int, chunk: int = CHUNK) -> torch.Tensor:
    """Distance from every point to its k-th nearest neighbour in the same set, itself excluded."""
    radii = []
    for block in features.split(chunk):
        d = torch.cdist(block, features)
        # The k+1 smallest include the point itself at distance 0 (or a duplicate, which then counts as a neighbour).
        radii.append(d.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def coverage(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = CHUNK) -> float:
    """Share of `queries` that fall inside at least one ball (centres[j], radii[j])."""
    inside = torch.zeros(len(queries), dtype=torch.bool, device=queries.device)
    for start in range(0, len(queries), chunk):
        q = queries[start : start + chunk]
        for c_start in range(0, len(centres), chunk):
            d = torch.cdist(q, centres[c_start : c_start + chunk])
            inside[start : start + chunk] |= (d <= radii[c_start : c_start + chunk]).any(dim=1)
    return inside.double().mean().item()


def precision_recall(real_features, fake_features, k: int = 4, chunk: int = CHUNK) -> dict[str, float]:
    """{"precision", "recall"} of fake vs real features (arrays or tensors of shape (N, D)).

    Both sets need more than k points so every point has k neighbours besides itself.
    """
    if not isinstance(k, int) or k < 1:
        raise BadInput(f"k must be an integer >= 1, got {k!r}")
    if not isinstance(chunk, int) or chunk < 1:
        raise BadInput(f"chunk must be an integer >= 1, got {chunk!r}")
    real = _as_features("real_features", real_features)
    fake = _as_features("fake_features", fake_features)
    if real.shape[1] != fake.shape[1]:
        raise BadInput(f"feature dimensions differ: real {real.shape[1]} vs fake {fake.shape[1]}; they must match")
    for name, t in (("real_features", real), ("fake_features", fake)):
        if len(t) <= k:
            raise BadInput(f"{name} has {len(t)} points; k={k} needs at least {k + 1}")
    fake = fake.to(dtype=real.dtype, device=real.device)
    with torch.no_grad():
        precision = coverage(fake, real, knn_radii(real, k, chunk), chunk)
        recall = coverage(real, fake, knn_radii(fake, k, chunk), chunk)
    return {"precision": precision, "recall": recall}
