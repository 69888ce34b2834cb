"""The one source of secret randomness: DP noise and private sampling are drawn from OS
entropy, never from `--seed` (which the manifest records and anyone could replay)."""

from __future__ import annotations

import secrets

import numpy as np
import torch


def secret_seed() -> int:
    return secrets.randbits(63)


def secret_generator() -> torch.Generator:
    """A torch generator seeded from OS entropy (its seed is never stored)."""
    return torch.Generator().manual_seed(secret_seed())


def secret_numpy_rng() -> np.random.Generator:
    return np.random.default_rng(secrets.randbits(128))


def reseed_global_rng() -> None:
    """Reseed torch's global RNG from OS entropy: code that samples or adds noise through the
    global RNG (opacus' DP optimizer and Poisson sampler) then draws secret values."""
    torch.manual_seed(secret_seed())
