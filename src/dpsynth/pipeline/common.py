"""What every stage shares: run-directory setup, dataset loading checked against the
manifest's keyed tags, caches, and the progress-callback type."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import ImageSet, content_digest, load_dataset
from ..data.keyed import keyed_members, keyed_tag
from ..errors import BadInput, RunDirError
from ..methods import get_method
from ..privacy.accountant import check_delta, compose_epsilon, default_delta
from ..privacy.owner_key import OwnerKey, check_outside, load_owner_key
from .rundir import RunDir
from ..mechanisms.noisy_val import reservation_event
from .holdout import check_holdout, holdout_record, split_off
from .sensitive_test import load_sensitive_test

from ..progress import Progress, no_progress  # noqa: F401  (the one progress signature; re-exported)
from ..notices import NOTICES  # noqa: F401  (one-time messages for the CLI; re-exported)


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
    public_size: int | None = None  # declared N: replaces the true size wherever N enters q, T, delta or a mean
    sensitive_test: str | None = None  # labelled test set disjoint from training (npz:/imagefolder: need one)

    def __post_init__(self) -> None:
        check_holdout(self.holdout)
        if self.noisy_val_eps is not None and not self.holdout:
            raise BadInput(f"noisy_val_eps={self.noisy_val_eps:g} needs a sensitive hold-out; pass `holdout` too")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 4):
            raise BadInput(f"resolution={self.resolution} must be a multiple of 4 and >= 8")
        if self.channels not in (None, 1, 3):
            raise BadInput(f"channels={self.channels} must be 1 or 3")
        if self.limit is not None and self.limit < 1:
            raise BadInput(f"limit={self.limit} must be >= 1")
        if self.public_size is not None and (isinstance(self.public_size, bool) or not isinstance(self.public_size, int)
                                             or self.public_size < 3):
            raise BadInput(f"public_size={self.public_size!r} is not allowed; it must be an integer >= 3")
        if self.public_size is not None and self.limit is not None and self.limit > self.public_size:
            raise BadInput(f"limit={self.limit} exceeds `public_size` {self.public_size}; allowed: at most it")


def _limit_fraction(settings: DataSettings, n: int) -> float:
    """--limit L keeps each record with probability L / N, N the declared size (the true size,
    public by convention, when --public-size is not given)."""
    if settings.limit is None:
        return 1.0
    return min(1.0, settings.limit / (settings.public_size or max(n, 1)))


def _load_full(settings: DataSettings, split: str) -> ImageSet:
    """The sensitive `split`; for "train", the --limit subset (keyed, 1-stable: see data.keyed)."""
    images = load_dataset(settings.sensitive, split, root=settings.data_root, resolution=settings.resolution,
                          channels=settings.channels, seed=settings.seed)
    if split != "train" or settings.limit is None:
        return images
    return _limited(settings, images)


def _limited(settings: DataSettings, images: ImageSet) -> ImageSet:
    keep = keyed_members(images, load_owner_key(), _limit_fraction(settings, len(images)), "limit", settings.seed)
    if not keep.any():
        raise BadInput(f"limit={settings.limit} of {len(images)} sensitive images kept none; use a larger `limit`")
    return images.subset(keep)


def load_sensitive(settings: DataSettings, split: str = "train") -> ImageSet:
    """The sensitive `split`; for "train", WITHOUT the run's hold-out, so no stage trains on it."""
    images = _load_full(settings, split)
    if split != "train":
        return images
    return split_off(images, settings.holdout or 0.0, settings.seed, load_owner_key())[0]


def load_holdout(run: RunDir) -> ImageSet:
    """The run's sensitive hold-out, checked against the keyed tag recorded when the run was created."""
    settings = settings_from_run(run)
    record = run.manifest.get("holdout") or {}
    if not settings.holdout or not record.get("size"):
        raise BadInput(f"run {run.path} has no sensitive hold-out; noisy-val and dpimagebench-val need one: "
                       f"create the run with `holdout` FRACTION (e.g. `holdout` 0.0833: 5,000 of 60,000)")
    key = load_owner_key()
    _, held = split_off(_load_full(settings, "train"), settings.holdout, settings.seed, key)
    if "tag" not in record:  # runs made before keyed tags recorded the hold-out's indices, not its content
        raise RunDirError(f"the sensitive hold-out of {run.path} was chosen by an earlier dpsynth that shuffled "
                          f"indices; this version cannot reproduce it, so noisy-val needs a new run")
    _check_key(run, key, record.get("key_id"), "holdout")
    if keyed_tag(held, key) != record["tag"]:
        raise RunDirError(f"the sensitive hold-out of {run.path} no longer matches the one recorded at creation; "
                          f"the dataset changed")
    return held


def load_public(settings: DataSettings, like: ImageSet) -> ImageSet:
    if not settings.public:
        raise BadInput("this stage needs a public dataset; pass `public` NAME")
    _, channels, resolution, _ = like.images.shape
    return load_dataset(settings.public, "train", root=settings.data_root, resolution=resolution, channels=channels)


# What the manifest says about the sensitive set is public metadata plus one keyed tag; see
# privacy.assumptions for why N may be written at all.
SIZE_DECLARED = "declared by the run's public_size setting; the true size is not released"
SIZE_TRUE = "the true size, released (treated as public, as opacus and DPImageBench do)"


def dataset_record(images: ImageSet, key: OwnerKey, declared_size: int, size_basis: str) -> dict:
    _, c, h, _ = images.images.shape
    return {"name": images.name, "split": images.split, "size": int(declared_size), "size_basis": size_basis,
            "num_classes": int(images.num_classes), "resolution": int(h), "channels": int(c),
            "tag": keyed_tag(images, key), "key_id": key.key_id, "source": images.source}


def public_record(images: ImageSet) -> dict:
    """A PUBLIC dataset's record: a plain content digest is fine here (nothing private to hide)."""
    n, c, h, _ = images.images.shape
    return {"name": images.name, "split": images.split, "size": int(n), "num_classes": int(images.num_classes),
            "resolution": int(h), "channels": int(c), "sha256": content_digest(images), "source": images.source}


def privacy_assumptions(size_basis: str) -> dict:
    return {"adjacency": "add/remove one image (record-level)",
            "dataset_size": f"public: N in this manifest is {size_basis}",
            "outside_ledger": "evaluation figures computed on sensitive data (fidelity against the training set, "
                              "test accuracy) are reporting, not release; choosing among runs by them is not "
                              "accounted"}


def declared_size(run: RunDir) -> int:
    """N of the sensitive training set as the mechanisms must use it (q, steps, means): the declared one."""
    return int(run.manifest["sensitive"]["size"])


def settings_from_run(run: RunDir) -> DataSettings:
    s = run.manifest["settings"]
    return DataSettings(**{k: s.get(k) for k in DataSettings.__dataclass_fields__ if k in s})


def _check_key(run: RunDir, key: OwnerKey, recorded_id: str | None, what: str) -> None:
    if recorded_id and recorded_id != key.key_id:
        raise RunDirError(f"the {what} tag of {run.path} was made with owner key {recorded_id}, but "
                          f"{key.path} is key {key.key_id}; set DPSYNTH_HOME to the directory holding the run's key")


def check_same_data(run: RunDir, images: ImageSet, key: str = "sensitive") -> None:
    """The data must be the run's own. A manifest from before keyed tags carries a plain sha256
    fingerprint: it is checked as it is and replaced in memory by the keyed tag, which the
    stage's next save writes (a membership oracle must not outlive the next stage)."""
    record = run.manifest.get(key) or {}
    owner = load_owner_key()
    if "tag" in record:
        _check_key(run, owner, record.get("key_id"), key)
        if keyed_tag(images, owner) != record["tag"]:
            raise RunDirError(f"{key} dataset {images.name} differs from the one this run was created with "
                              f"(keyed tags differ); use a new `run` directory")
        return
    legacy = record.get("fingerprint")
    if legacy:
        if content_digest(images) != legacy:
            settings = settings_from_run(run)
            if settings.limit is not None or settings.holdout:
                raise RunDirError(f"{run.path} was made by an earlier dpsynth whose `limit`/`holdout` subset was a "
                                  f"shuffle (not 1-stable); this version cannot reproduce it: start a new run")
            raise RunDirError(f"{key} dataset {images.name} differs from the one this run was created with "
                              f"(legacy fingerprints differ); use a new `run` directory")
        del record["fingerprint"]
        record.update(tag=keyed_tag(images, owner), key_id=owner.key_id)
        NOTICES.append(f"{run.path}: replaced the manifest's plain sha256 fingerprint of the {key} set (a "
                       f"membership oracle) with a keyed tag under owner key {owner.key_id}")




def open_or_create_run(run_path: str | Path, *, method: str | None, settings: DataSettings | None,
                       delta: float | None) -> tuple[RunDir, ImageSet]:
    """Open an existing run (flags must agree with it) or prepare a new one in memory.
    Returns the run and its sensitive training set; nothing is written here."""
    if delta is not None:
        check_delta(delta)
    if RunDir.exists(run_path):
        run = RunDir.open(run_path)
        if method and method != run.manifest["method"]:
            raise BadInput(f"method={method} does not match this run's method {run.manifest['method']!r}")
        recorded = settings_from_run(run)
        if settings and settings.sensitive and settings.sensitive != recorded.sensitive:
            raise BadInput(f"sensitive={settings.sensitive} does not match this run's {recorded.sensitive!r}")
        if settings and (settings.holdout != recorded.holdout or settings.noisy_val_eps != recorded.noisy_val_eps):
            raise BadInput(f"holdout={settings.holdout:g} / noisy_val_eps={settings.noisy_val_eps} differ from "
                           f"this run's ({recorded.holdout:g} / {recorded.noisy_val_eps}); they are fixed at creation")
        if settings and settings.public_size is not None and settings.public_size != recorded.public_size:
            raise BadInput(f"public_size={settings.public_size} differs from this run's {recorded.public_size}; "
                           f"it is fixed at creation")
        if settings and settings.sensitive_test and settings.sensitive_test != recorded.sensitive_test:
            raise BadInput(f"sensitive_test={settings.sensitive_test} differs from this run's "
                           f"{recorded.sensitive_test or 'none'}; it is recorded at creation (give it to "
                           f"'dpsynth evaluate' with `sensitive_test` instead)")
        if delta is not None and delta != run.delta:
            raise BadInput(f"delta={delta:g} differs from this run's delta {run.delta:g}; delta is fixed per run")
        sensitive = load_sensitive(recorded)
        check_same_data(run, sensitive)
        return run, sensitive
    if settings is None or not settings.sensitive:
        raise RunDirError(f"run directory {run_path} does not exist; create it with 'dpsynth select-public' "
                          f"or pass `sensitive` NAME to start a run here")
    method_obj = get_method(method or "privimage-cvae")
    owner = load_owner_key()
    check_outside(owner, run_path)
    whole = load_dataset(settings.sensitive, "train", root=settings.data_root, resolution=settings.resolution,
                         channels=settings.channels, seed=settings.seed)
    full = whole if settings.limit is None else _limited(settings, whole)
    if full.labels is None or full.num_classes < 1:
        raise BadInput(f"sensitive dataset {settings.sensitive} has no labels; the conditional generators need them")
    # The hold-out is decided here, before any mechanism reads the data, and never changes.
    sensitive, held = split_off(full, settings.holdout, settings.seed, owner)
    if settings.sensitive_test:  # checked now, so a typo or a mismatched file costs no privacy budget
        load_sensitive_test(settings.sensitive_test, settings, sensitive)
    # delta is per protected image: N counts the hold-out too (it is sensitive data as well).
    if settings.public_size is not None:
        n = settings.limit or settings.public_size
        n_train = max(1, round(n * (1.0 - settings.holdout)))
        basis = SIZE_DECLARED
    else:
        n, n_train, basis = len(full), len(sensitive), SIZE_TRUE
    n_whole = len(whole) if settings.public_size is None else settings.public_size
    if delta is None and settings.limit is not None and n != n_whole:
        NOTICES.append(_limit_moves_delta(n, n_whole))
    delta = delta if delta is not None else default_delta(n)
    if delta >= 1.0 / n:
        raise BadInput(f"delta={delta:g} must be < 1/N = {1.0 / n:.3g} for N={n} images")
    public_record = {"name": settings.public} if settings.public else None
    run = RunDir.create(run_path, method=method_obj.name, sensitive=dataset_record(sensitive, owner, n_train, basis),
                        public=public_record, delta=delta, settings=settings.__dict__,
                        assumptions=privacy_assumptions(basis))
    if held is not None:
        run.manifest["holdout"] = holdout_record(settings.holdout, settings.seed, held, owner, size=n - n_train)
    if settings.noisy_val_eps is not None:
        event = reservation_event(settings.noisy_val_eps, [], delta)
        run.record_event(event, compose_epsilon([event], delta), save=False)
    return run, sensitive


def _limit_moves_delta(n: int, n_whole: int) -> str:
    """The default delta follows N, and `limit` sets N: say so once, with both values."""
    return (f"delta = 1/(N ln N) = {default_delta(n):.3g} for the N = {n:,} images `limit` keeps "
            f"(the whole set, N = {n_whole:,}, would give {default_delta(n_whole):.3g}); pass `delta` to set it")


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
