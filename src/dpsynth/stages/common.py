"""What every stage shares: run-directory setup, dataset loading checked against the
manifest's fingerprints, caches, and the progress-callback type."""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..data import ImageSet, fingerprint, load_dataset
from ..errors import BadInput, RunDirError
from ..methods import get_method
from ..privacy.accountant import check_delta, default_delta
from ..rundir import RunDir

# progress(phase, done, total); the CLI draws rich bars from it, the library never prints.
Progress = Callable[[str, int, int], None]


def no_progress(phase: str, done: int, total: int) -> None:
    return None


@dataclass(frozen=True)
class DataSettings:
    """How the run's datasets are read; fixed when the run is created."""

    sensitive: str
    public: str | None
    resolution: int | None = None
    channels: int | None = None
    limit: int | None = None
    seed: int = 0
    data_root: str | None = None

    def __post_init__(self) -> None:
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 4):
            raise BadInput(f"--resolution {self.resolution} must be a multiple of 4 and >= 8")
        if self.channels not in (None, 1, 3):
            raise BadInput(f"--channels {self.channels} must be 1 or 3")
        if self.limit is not None and self.limit < 1:
            raise BadInput(f"--limit {self.limit} must be >= 1")


def check_positive(flag: str, value: float, integer: bool = False) -> None:
    ok = value is not None and math.isfinite(value) and value > 0 and (not integer or float(value).is_integer())
    if not ok:
        raise BadInput(f"{flag} {value!r} is not allowed; it must be {'an integer' if integer else 'a number'} > 0")


def load_sensitive(settings: DataSettings, split: str = "train") -> ImageSet:
    return load_dataset(settings.sensitive, split, root=settings.data_root, resolution=settings.resolution,
                        channels=settings.channels, limit=settings.limit if split == "train" else None,
                        seed=settings.seed)


def load_public(settings: DataSettings, like: ImageSet) -> ImageSet:
    if not settings.public:
        raise BadInput("this stage needs a public dataset; pass --public NAME")
    _, channels, resolution, _ = like.images.shape
    return load_dataset(settings.public, "train", root=settings.data_root, resolution=resolution, channels=channels)


def dataset_record(images: ImageSet) -> dict:
    n, c, h, w = images.images.shape
    return {"name": images.name, "split": images.split, "size": int(n), "num_classes": int(images.num_classes),
            "resolution": int(h), "channels": int(c), "fingerprint": fingerprint(images), "source": images.source}


def settings_from_run(run: RunDir) -> DataSettings:
    s = run.manifest["settings"]
    return DataSettings(**{k: s.get(k) for k in DataSettings.__dataclass_fields__ if k in s})


def check_same_data(run: RunDir, images: ImageSet, key: str = "sensitive") -> None:
    recorded = (run.manifest.get(key) or {}).get("fingerprint")
    actual = fingerprint(images)
    if recorded and recorded != actual:
        raise RunDirError(f"{key} dataset {images.name} differs from the one this run was created with "
                          f"({actual[:19]}… != {recorded[:19]}…); use a new --run directory")


def open_or_create_run(run_path: str | Path, *, method: str | None, settings: DataSettings | None,
                       delta: float | None) -> tuple[RunDir, ImageSet]:
    """Open an existing run (flags must agree with it) or prepare a new one in memory.
    Returns the run and its sensitive training set; nothing is written here."""
    if delta is not None:
        check_delta(delta)
    if RunDir.exists(run_path):
        run = RunDir.open(run_path)
        if method and method != run.manifest["method"]:
            raise BadInput(f"--method {method} does not match this run's method {run.manifest['method']!r}")
        recorded = settings_from_run(run)
        if settings and settings.sensitive and settings.sensitive != recorded.sensitive:
            raise BadInput(f"--sensitive {settings.sensitive} does not match this run's {recorded.sensitive!r}")
        if delta is not None and delta != run.delta:
            raise BadInput(f"--delta {delta:g} differs from this run's delta {run.delta:g}; delta is fixed per run")
        sensitive = load_sensitive(recorded)
        check_same_data(run, sensitive)
        return run, sensitive
    if settings is None or not settings.sensitive:
        raise RunDirError(f"run directory {run_path} does not exist; create it with 'dpsynth select-public' "
                          f"or pass --sensitive NAME to start a run here")
    method_obj = get_method(method or "privimage-cvae")
    sensitive = load_sensitive(settings)
    if sensitive.labels is None or sensitive.num_classes < 1:
        raise BadInput(f"sensitive dataset {settings.sensitive} has no labels; the conditional generators need them")
    delta = delta if delta is not None else default_delta(len(sensitive))
    if delta >= 1.0 / len(sensitive):
        raise BadInput(f"--delta {delta:g} must be < 1/N = {1.0 / len(sensitive):.3g} for N={len(sensitive)} images")
    public_record = {"name": settings.public} if settings.public else None
    run = RunDir.create(run_path, method=method_obj.name, sensitive=dataset_record(sensitive),
                        public=public_record, delta=delta, settings=settings.__dict__)
    return run, sensitive


def cache_dir() -> Path:
    """Models trained on PUBLIC data only (safe to share across runs)."""
    path = Path(os.environ.get("DPSYNTH_CACHE", Path.home() / ".cache" / "dpsynth" / "models"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def torch_load_bytes(data: bytes):
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
