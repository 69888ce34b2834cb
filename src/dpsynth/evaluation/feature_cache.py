"""Features cached per (image set, feature network), so a repeated evaluation skips extraction.

The key is the sha256 of the images' shape and bytes plus the network's identity (its name
carries its weights' hash) and resolution, so a changed set or network never hits a stale
entry. Features of sensitive images are as sensitive as the images: the cache belongs next
to the data (the stage puts it under the data root), never in a released run directory.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dpsynth.evaluation.fidelity import FeatureNetwork


def images_digest(images: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(("x".join(map(str, images.shape)) + ";" + str(images.dtype) + ";").encode())
    h.update(images.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


class FeatureCache:
    """get(images, net, what, compute): the cached array, or compute() stored under its key.

    `directory=None` disables caching. `hits` and `misses` count lookups (for tests and logs).
    """

    def __init__(self, directory: str | os.PathLike | None):
        self.directory = None if directory is None else Path(directory)
        self.hits = 0
        self.misses = 0

    def key(self, images: torch.Tensor, net: FeatureNetwork, what: str) -> str:
        src = f"{images_digest(images)}|{net.name}|{net.resolution}|{what}|v1"
        return hashlib.sha256(src.encode()).hexdigest()[:40]

    def get(self, images: torch.Tensor, net: FeatureNetwork, what: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        if self.directory is None:
            self.misses += 1
            return compute()
        path = self.directory / f"{what}-{self.key(images, net, what)}.npy"
        if path.is_file():
            try:
                cached = np.load(path, allow_pickle=False)
                if cached.shape[0] == images.shape[0]:
                    self.hits += 1
                    return cached
            except (OSError, ValueError):
                pass  # unreadable entry: recompute and overwrite it
        self.misses += 1
        value = compute()
        self.directory.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.save(buffer, value, allow_pickle=False)
        from dpsynth.pipeline.rundir import atomic_write_bytes  # temp file + rename: a crash never leaves half a file

        atomic_write_bytes(path, buffer.getvalue())
        return value
