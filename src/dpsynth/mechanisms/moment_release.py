"""Noisy per-cell moments: the one mechanism of dp-gmm (methods/dp_gmm.py).

Every sensitive row x (a flattened image, clipped here to ||x|| <= bound) belongs to exactly one
cell (a class, or a (class, component) pair chosen by a rule that depends only on x, its label and
earlier releases). A release is the sum over rows of the cell-block vector
    v(x) = [ a vec(x x^T) / bound^2 ,  b x / bound ,  c ]   placed in the row's cell's block
(first-moment releases drop the first part), with a^2 + b^2 + c^2 <= 1. Since ||vec(x x^T)|| =
||x||^2 <= bound^2, ||v(x)|| <= 1: adding or removing one row moves the whole release (all cells
together) by at most 1 in L2, so adding N(0, sigma^2) to every coordinate is ONE Gaussian mechanism
of noise multiplier sigma (one GaussianEvent), however many cells there are. Empty cells release
pure noise, as the accounted mechanism must. The full D x D second-moment block is released (the
symmetrisation afterwards is post-processing).

The blocks' noises are independent, so a second-moment release is produced one cell at a time
(`second_moments` yields them): 80 cells of 784 x 784 never sit in memory together. Rows stay in
the caller's dtype (float32 at CelebA's 162k x 3072 is 2 GB; a float64 copy of them all would be 4 GB
more) and are clipped and summed in float64 `CHUNK` rows at a time.
Noise comes from the global RNG, which the finetune stage reseeds from OS entropy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch

from .embedding_release import MARGIN, gaussian_release

# Shares of the unit sensitivity: second moments carry most of the signal that noise would drown.
SECOND, FIRST = 0.8 * MARGIN, 0.55 * MARGIN
COUNT = math.sqrt(1.0 - 0.8 ** 2 - 0.55 ** 2) * MARGIN
# First-moment releases (no second moments): the sums, and the counts that divide them.
FIRST_ONLY, COUNT_ONLY = 0.95 * MARGIN, math.sqrt(1.0 - 0.95 ** 2) * MARGIN
CHUNK = 8192  # rows clipped in float64 at once (memory), whatever the rows' own dtype


def _clipped_chunks(rows: torch.Tensor, bound: float) -> Iterator[tuple[slice, torch.Tensor]]:
    """(where, rows[where] in float64 clipped to `bound`) over consecutive chunks of rows."""
    for start in range(0, len(rows), CHUNK):
        where = slice(start, start + CHUNK)
        yield where, clip_rows(rows[where].double(), bound)


def clip_rows(rows: torch.Tensor, bound: float) -> torch.Tensor:
    """Each row scaled down to L2 norm <= bound (rows already inside are unchanged)."""
    if not (math.isfinite(bound) and bound > 0):
        raise AssertionError(f"clip bound {bound!r} must be > 0")
    norms = rows.norm(dim=1, keepdim=True)
    return rows * (bound / norms.clamp(min=bound))


def _check(rows: torch.Tensor, cells: torch.Tensor, num_cells: int) -> None:
    if rows.dim() != 2 or cells.shape != (len(rows),):
        raise AssertionError(f"rows {tuple(rows.shape)} and cells {tuple(cells.shape)} must be (n, D) and (n,)")
    if len(cells) and not (0 <= int(cells.min()) and int(cells.max()) < num_cells):
        raise AssertionError(f"cell indices must lie in [0, {num_cells})")


@dataclass(frozen=True)
class FirstMoments:
    """Noisy estimates, rescaled (post-processing): `sums` of x per cell (cells, D), `counts` (cells,)."""

    sums: torch.Tensor
    counts: torch.Tensor


@dataclass(frozen=True)
class CellMoments:
    """One cell of a second-moment release, rescaled: estimates of sum x x^T (D, D, symmetrised),
    sum x (D,) and the count."""

    cell: int
    second: torch.Tensor
    first: torch.Tensor
    count: float


def first_moments(rows: torch.Tensor, cells: torch.Tensor, num_cells: int, *, bound: float,
                  noise_multiplier: float) -> FirstMoments:
    """One Gaussian release of every cell's [b x / bound, c] sum."""
    _check(rows, cells, num_cells)
    sums = torch.zeros(num_cells, rows.shape[1], dtype=torch.float64, device=rows.device)
    for where, x in _clipped_chunks(rows, bound):
        sums.index_add_(0, cells[where], x)
    counts = torch.bincount(cells, minlength=num_cells).double()
    noisy_sums = gaussian_release(FIRST_ONLY * sums / bound, noise_multiplier)
    noisy_counts = gaussian_release(COUNT_ONLY * counts, noise_multiplier)
    return FirstMoments(sums=noisy_sums * bound / FIRST_ONLY, counts=noisy_counts / COUNT_ONLY)


def second_moments(rows: torch.Tensor, cells: torch.Tensor, num_cells: int, *, bound: float,
                   noise_multiplier: float) -> Iterator[CellMoments]:
    """One Gaussian release of every cell's [a vec(x x^T) / bound^2, b x / bound, c] sum, one cell at
    a time (cell 0 first; every cell is released, empty or not)."""
    _check(rows, cells, num_cells)
    dim = rows.shape[1]
    for cell in range(num_cells):
        mine = rows[cells == cell]
        outer = torch.zeros(dim, dim, dtype=torch.float64, device=rows.device)
        total = torch.zeros(dim, dtype=torch.float64, device=rows.device)
        for _, x in _clipped_chunks(mine, bound):
            outer.addmm_(x.t(), x)
            total += x.sum(0)
        second = gaussian_release(SECOND * outer / bound ** 2, noise_multiplier) * bound ** 2 / SECOND
        first = gaussian_release(FIRST * total / bound, noise_multiplier) * bound / FIRST
        count = gaussian_release(torch.tensor(COUNT * len(mine), dtype=torch.float64, device=rows.device),
                                 noise_multiplier) / COUNT
        yield CellMoments(cell=cell, second=(second + second.t()) / 2, first=first, count=float(count))
