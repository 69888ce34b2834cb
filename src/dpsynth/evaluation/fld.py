"""Feature Likelihood Divergence (Jiralerspong et al., NeurIPS 2023, "Feature Likelihood Divergence:
Evaluating the Generalization of Generative Models Using Samples"; earlier titled Feature Likelihood Score).

What is implemented here, exactly:

1. Features of all three sets are standardised per dimension with the mean and
   std of the real TEST features (as the authors' code does; a zero std is
   replaced by 1).
2. A mixture of M isotropic Gaussians with equal weights 1/M is centred at the
   M generated features; component j has its own variance s_j^2 (a per-sample
   KDE bandwidth). The variances are fitted by maximising the likelihood of
   the real TRAIN features, with EM on the variances only (means and weights
   stay fixed): each step sets s_j^2 to the responsibility-weighted mean of
   ||x_i - mu_j||^2 / d. EM never lowers the train likelihood. It starts from
   s_j^2 = (distance to the nearest train point)^2 / d, and log s_j^2 is clamped
   to [-40, 20] so a generated point that copies a train point gets a tiny but
   finite variance.
3. `kde_test_nll` is the mean over real TEST features of -log p(x) / d
   (negative log-likelihood in nats per feature dimension).
4. `fld` reports 100 * (kde_test_nll(fake) - baseline), the baseline being the
   same NLL for a mixture centred at min(M, N_train // 2) real train features
   (a seeded random half) fitted on the remaining train features. Lower is
   better; about 0 means "as good as held-out real data".

Differences from the authors' code (marcojira/fld): it fits the log-variances
with Adam (lr 0.5, 50 epochs, mini-batches) plus an extra broad component at
the train mean during fitting only, and subsamples 10k generated points; we
use plain EM and no extra component, and use all generated points. Like
theirs, FLD rewards generalisation: generated points that copy training
points get near-zero bandwidths, so held-out test points become unlikely and
FLD rises sharply. Numbers on our domain feature networks are not comparable
to published FLD values computed on Inception or DINOv2 features.

Memory: the train x generated squared-distance matrix is cached as float32
(10k x 10k is 400 MB); everything else is streamed in row chunks. Tensors on
a GPU are computed there.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from dpsynth.errors import BadInput

LOG_VAR_MIN, LOG_VAR_MAX = -40.0, 20.0
CHUNK = 1024  # rows per cdist block


def _as_features(name: str, x, minimum: int) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.ndim != 2 or t.shape[1] == 0 or t.shape[0] < minimum:
        raise BadInput(f"{name} must be an (N, D) feature array with N >= {minimum}, got shape {tuple(t.shape)}")
    t = t.to(torch.float64) if t.dtype == torch.float64 else t.to(torch.float32)
    if not torch.isfinite(t).all():
        raise BadInput(f"{name} contains NaN or infinite values; features must be finite")
    return t


def _sq_dists(points: torch.Tensor, centres: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.cat([torch.cdist(block, centres).square() for block in points.split(chunk)])


def _component_log_densities(sq: torch.Tensor, log_var: torch.Tensor, dim: int) -> torch.Tensor:
    """log N(x_i | mu_j, s_j^2 I) from squared distances (rows i, columns j)."""
    return -0.5 * sq * torch.exp(-log_var) - 0.5 * dim * (log_var + math.log(2 * math.pi))


def fit_log_variances(
    centres: torch.Tensor, fit_points: torch.Tensor, iterations: int = 100, tol: float = 1e-6, chunk: int = CHUNK
) -> torch.Tensor:
    """Per-centre log variances maximising the likelihood of `fit_points` (EM on variances only).

    Stops after `iterations` EM steps or once the per-dimension train NLL improves by less than `tol`.
    """
    dim, m = centres.shape[1], len(centres)
    sq = _sq_dists(fit_points, centres, chunk)  # (N_fit, M), the only full-size tensor kept
    log_var = torch.log(sq.min(dim=0).values / dim + 1e-12).clamp(LOG_VAR_MIN, LOG_VAR_MAX)
    previous = math.inf
    for _ in range(iterations):
        # Column-wise log sums of responsibilities (and of responsibility * distance), streamed over row blocks.
        resp_sum = torch.full((m,), -math.inf, dtype=sq.dtype, device=sq.device)
        weighted_sum = resp_sum.clone()
        total_ll = 0.0
        for block in sq.split(chunk):
            log_dens = _component_log_densities(block, log_var, dim)
            log_mix = torch.logsumexp(log_dens, dim=1, keepdim=True)  # up to the constant -log M
            total_ll += log_mix.sum().item()
            log_resp = log_dens - log_mix
            resp_sum = torch.logaddexp(resp_sum, torch.logsumexp(log_resp, dim=0))
            # log(0) = -inf where a point sits exactly on a centre: it adds nothing, as it should.
            weighted_sum = torch.logaddexp(weighted_sum, torch.logsumexp(log_resp + torch.log(block), dim=0))
        nll = -(total_ll / len(sq) - math.log(m)) / dim  # of the variances used in this E-step
        # M-step in log space, so centres with vanishing responsibility still get a defined variance.
        new = weighted_sum - resp_sum - math.log(dim)
        log_var = torch.nan_to_num(new, nan=LOG_VAR_MIN, neginf=LOG_VAR_MIN).clamp(LOG_VAR_MIN, LOG_VAR_MAX)
        if previous - nll < tol:
            break
        previous = nll
    return log_var


def mixture_nll(points: torch.Tensor, centres: torch.Tensor, log_var: torch.Tensor, chunk: int = CHUNK) -> float:
    """Mean of -log p(x) / d over `points` under the equal-weight isotropic mixture."""
    dim = centres.shape[1]
    total = 0.0
    for block in points.split(chunk):
        log_dens = _component_log_densities(torch.cdist(block, centres).square(), log_var, dim)
        total += (torch.logsumexp(log_dens, dim=1) - math.log(len(centres))).sum().item()
    return -total / (len(points) * dim)


def _prepare(train_real, test_real, fake):
    train = _as_features("train_real", train_real, 2)
    test = _as_features("test_real", test_real, 2)
    gen = _as_features("fake", fake, 1)
    dims = {train.shape[1], test.shape[1], gen.shape[1]}
    if len(dims) != 1:
        sizes = f"train {train.shape[1]}, test {test.shape[1]}, fake {gen.shape[1]}"
        raise BadInput(f"feature dimensions differ ({sizes}); they must match")
    dtype = torch.float64 if torch.float64 in (train.dtype, test.dtype, gen.dtype) else torch.float32
    mean = test.to(dtype).mean(dim=0)
    std = test.to(dtype).std(dim=0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return [((t.to(dtype) - mean) / std) for t in (train, test, gen)]


def kde_test_nll(train_real, test_real, fake, iterations: int = 100, chunk: int = CHUNK) -> float:
    """NLL per dimension of real test features under a Gaussian mixture at `fake`, bandwidths fitted on train."""
    train, test, gen = _prepare(train_real, test_real, fake)
    with torch.no_grad():
        log_var = fit_log_variances(gen, train, iterations, chunk=chunk)
        return mixture_nll(test, gen, log_var, chunk)


def baseline_nll(
    train_real, test_real, num_centres: int, seed: int = 0, iterations: int = 100, chunk: int = CHUNK
) -> float:
    """The same NLL with real train features (a seeded random subset) in place of generated ones."""
    train, test, _ = _prepare(train_real, test_real, train_real)
    m = min(num_centres, len(train) // 2)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).to(train.device)
    centres, fit_points = train[order[:m]], train[order[m:]]
    with torch.no_grad():
        log_var = fit_log_variances(centres, fit_points, iterations, chunk=chunk)
        return mixture_nll(test, centres, log_var, chunk)


def fld(train_real, test_real, fake, seed: int = 0, iterations: int = 100, chunk: int = CHUNK) -> float:
    """FLD = 100 * (test NLL under the fake-centred mixture - test NLL under a real-centred baseline); lower is better.

    Arrays or tensors of shape (N, D) from the same feature network. `seed`
    picks the baseline's random half of the train set.
    """
    if not isinstance(iterations, int) or iterations < 1:
        raise BadInput(f"iterations must be an integer >= 1, got {iterations!r}")
    if not isinstance(chunk, int) or chunk < 1:
        raise BadInput(f"chunk must be an integer >= 1, got {chunk!r}")
    nll = kde_test_nll(train_real, test_real, fake, iterations, chunk)
    base = baseline_nll(train_real, test_real, len(fake), seed, iterations, chunk)
    return 100.0 * (nll - base)
