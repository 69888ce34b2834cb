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
from ..privacy.accountant import check_delta, compose_epsilon, default_delta
from ..rundir import RunDir, now
from .holdout import check_holdout, holdout_record, indices_sha256, reservation_event, split_off
from .sensitive_test import load_sensitive_test

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
    holdout: float = 0.0  # share of the sensitive train set kept from the generator for noisy-val
    noisy_val_eps: float | None = None  # epsilon reserved in the ledger at creation for noisy-val
    sensitive_test: str | None = None  # labelled test set disjoint from training (npz:/imagefolder: need one)

    def __post_init__(self) -> None:
        check_holdout(self.holdout)
        if self.noisy_val_eps is not None and not self.holdout:
            raise BadInput(f"--noisy-val-eps {self.noisy_val_eps:g} needs a sensitive hold-out; pass --holdout too")
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


def _load_full(settings: DataSettings, split: str) -> ImageSet:
    return load_dataset(settings.sensitive, split, root=settings.data_root, resolution=settings.resolution,
                        channels=settings.channels, limit=settings.limit if split == "train" else None,
                        seed=settings.seed)


def load_sensitive(settings: DataSettings, split: str = "train") -> ImageSet:
    """The sensitive `split`; for "train", WITHOUT the run's hold-out, so no stage trains on it."""
    images = _load_full(settings, split)
    if split != "train":
        return images
    return split_off(images, settings.holdout or 0.0, settings.seed)[0]


def load_holdout(run: RunDir) -> ImageSet:
    """The run's sensitive hold-out, checked against the indices recorded when the run was created."""
    settings = settings_from_run(run)
    record = run.manifest.get("holdout") or {}
    if not settings.holdout or not record.get("size"):
        raise BadInput(f"run {run.path} has no sensitive hold-out; noisy-val needs one: create the run with "
                       f"--holdout FRACTION (e.g. --holdout 0.1)")
    full = _load_full(settings, "train")
    _, held, indices = split_off(full, settings.holdout, settings.seed)
    if indices_sha256(indices) != record.get("indices_sha256"):
        raise RunDirError(f"the sensitive hold-out of {run.path} no longer matches the indices recorded at creation "
                          f"({record.get('indices_sha256', '')[:19]}…); the dataset changed")
    return held


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
        if settings and (settings.holdout != recorded.holdout or settings.noisy_val_eps != recorded.noisy_val_eps):
            raise BadInput(f"--holdout {settings.holdout:g} / --noisy-val-eps {settings.noisy_val_eps} differ from "
                           f"this run's ({recorded.holdout:g} / {recorded.noisy_val_eps}); they are fixed at creation")
        if settings and settings.sensitive_test and settings.sensitive_test != recorded.sensitive_test:
            raise BadInput(f"--sensitive-test {settings.sensitive_test} differs from this run's "
                           f"{recorded.sensitive_test or 'none'}; it is recorded at creation (give it to "
                           f"'dpsynth evaluate --sensitive-test' instead)")
        if delta is not None and delta != run.delta:
            raise BadInput(f"--delta {delta:g} differs from this run's delta {run.delta:g}; delta is fixed per run")
        sensitive = load_sensitive(recorded)
        check_same_data(run, sensitive)
        return run, sensitive
    if settings is None or not settings.sensitive:
        raise RunDirError(f"run directory {run_path} does not exist; create it with 'dpsynth select-public' "
                          f"or pass --sensitive NAME to start a run here")
    method_obj = get_method(method or "privimage-cvae")
    full = _load_full(settings, "train")
    if full.labels is None or full.num_classes < 1:
        raise BadInput(f"sensitive dataset {settings.sensitive} has no labels; the conditional generators need them")
    # The hold-out is decided here, before any mechanism reads the data, and never changes.
    sensitive, _, held = split_off(full, settings.holdout, settings.seed)
    if settings.sensitive_test:  # checked now, so a typo or a mismatched file costs no privacy budget
        load_sensitive_test(settings.sensitive_test, settings, sensitive)
    # delta is per protected image: N counts the hold-out too (it is sensitive data as well).
    n = len(full)
    delta = delta if delta is not None else default_delta(n)
    if delta >= 1.0 / n:
        raise BadInput(f"--delta {delta:g} must be < 1/N = {1.0 / n:.3g} for N={n} images")
    public_record = {"name": settings.public} if settings.public else None
    run = RunDir.create(run_path, method=method_obj.name, sensitive=dataset_record(sensitive),
                        public=public_record, delta=delta, settings=settings.__dict__)
    if held.numel():
        run.manifest["holdout"] = holdout_record(settings.holdout, settings.seed, held, n)
    if settings.noisy_val_eps is not None:
        _append_event(run, reservation_event(settings.noisy_val_eps, [], delta))
    return run, sensitive


def _append_event(run: RunDir, event) -> None:
    """Put `event` in the new run's in-memory ledger, as `RunDir.record_event` records it; the creating
    stage's first save writes it, before that stage (or any later one) runs a mechanism."""
    events = [*run.events(), event]
    after = compose_epsilon(events, run.delta)
    record = {k: v for k, v in event.to_dict().items() if k != "note" or v}
    record.update(time=now(), epsilon_after=float(after.upper), accountant=after.accountant)
    run.manifest["privacy"]["events"].append(record)
    run.manifest["privacy"]["epsilon"] = float(after.upper)
    run.manifest["privacy"]["accountant"] = after.accountant


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
