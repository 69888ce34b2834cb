"""Closed-form privacy curve of a shard_gaussian event, computed apart from the accountant.

delta(eps) = sum_K Bin(K; T, 1/N_d) * delta_Gauss(eps; mu_K), mu_K^2 = K / sigma^2 (+ mu0^2 for
a Gaussian composed with it), delta_Gauss from Balle & Wang (2018), Thm. 8, in log space so
that large eps does not overflow.
"""

import numpy as np
from scipy.optimize import brentq
from scipy.stats import binom, norm


def gaussian_delta(eps: float, mu: np.ndarray) -> np.ndarray:
    mu = np.asarray(mu, dtype=float)
    safe = np.where(mu > 0, mu, 1.0)
    value = norm.cdf(-eps / safe + safe / 2) - np.exp(eps + norm.logcdf(-eps / safe - safe / 2))
    return np.where(mu > 0, np.maximum(value, 0.0), 0.0)  # mu = 0: the pair is identical


def shard_gaussian_delta(eps: float, sigma: float, shards: int, steps: int, mu0: float = 0.0) -> float:
    k = np.arange(steps + 1)
    weights = binom.pmf(k, steps, 1.0 / shards)
    return float(np.sum(weights * gaussian_delta(eps, np.sqrt(k / sigma ** 2 + mu0 ** 2))))


def shard_gaussian_epsilon(delta: float, sigma: float, shards: int, steps: int, mu0: float = 0.0) -> float:
    if shard_gaussian_delta(0.0, sigma, shards, steps, mu0) <= delta:
        return 0.0
    return brentq(lambda e: shard_gaussian_delta(e, sigma, shards, steps, mu0) - delta, 0.0, 1000.0, xtol=1e-6)
