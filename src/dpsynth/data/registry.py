"""Name -> loader registry and the single entry point `load_dataset`.

A loader is `fn(req: LoadRequest) -> ImageSet`. Names ending in ':' are
prefixes (e.g. 'npz:'), receiving the rest of the name as `req.arg`. A plain
dict keeps the set of datasets open for extension without an if/elif chain.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dpsynth.errors import BadInput
from dpsynth.validation import check_positive

from .imageset import ImageSet, resize_images

SPLITS = ("train", "test")
_REGISTRY: dict[str, Callable[[LoadRequest], ImageSet]] = {}


@dataclass(frozen=True)
class LoadRequest:
    """What a loader gets; loaders may use `pick` to subsample before decoding files."""

    name: str  # as given by the user
    arg: str | None  # text after the prefix for 'npz:PATH'-style names
    split: str
    root: Path
    resolution: int | None
    channels: int | None
    limit: int | None
    seed: int

    def pick(self, labels: torch.Tensor | None, n: int) -> torch.Tensor | None:
        """Indices `load_dataset` would keep for `limit`, or None to keep all n."""
        if self.limit is None or self.limit >= n:
            return None
        return choose_subset(labels, n, self.limit, self.seed)


def register_dataset(name: str, fn: Callable[[LoadRequest], ImageSet]) -> None:
    """Add a loader; refusing duplicates stops a plugin silently replacing a builtin."""
    if not name or name != name.strip() or name.count(":") > (1 if name.endswith(":") else 0):
        raise BadInput(f"dataset name {name!r} is invalid; allowed: a bare word or a 'prefix:' ending in one colon")
    if name in _REGISTRY:
        raise BadInput(f"dataset '{name}' is already registered")
    _REGISTRY[name] = fn


def dataset_names() -> list[str]:
    """Plain names first, then prefix forms shown as 'prefix:PATH'."""
    plain = sorted(n for n in _REGISTRY if not n.endswith(":"))
    prefixed = sorted(n + "PATH" for n in _REGISTRY if n.endswith(":"))
    return plain + prefixed


def data_root(root: str | Path | None = None) -> Path:
    """root argument > $DPSYNTH_DATA > ~/.cache/dpsynth/data (not created here)."""
    if root is None or str(root) == "":
        root = os.environ.get("DPSYNTH_DATA") or Path.home() / ".cache" / "dpsynth" / "data"
    return Path(root).expanduser()


def choose_subset(labels: torch.Tensor | None, n: int, limit: int, seed: int) -> torch.Tensor:
    """Sorted indices of `limit` of n items, deterministic in `seed`.

    Labelled: class-stratified. Each class gets floor(limit * share) slots, the
    leftover slots go to the largest fractional remainders (ties: lower class id);
    members are drawn uniformly within each class. Unlabelled: uniform random.
    Sorting keeps the original order, so a subset reads like the full set.
    """
    g = torch.Generator().manual_seed(int(seed))
    if labels is None:
        return torch.randperm(n, generator=g)[:limit].sort().values
    counts = torch.bincount(labels, minlength=int(labels.max()) + 1 if n else 0)
    exact = counts.double() * limit / n
    quota = exact.floor().long()
    short = limit - int(quota.sum())
    if short:
        # Stable sort on -remainder -> ties resolved by class id.
        order = torch.sort(-(exact - quota), stable=True).indices
        quota[order[:short]] += 1
    picked = []
    for cls in torch.nonzero(quota).flatten().tolist():
        members = torch.nonzero(labels == cls).flatten()
        perm = torch.randperm(len(members), generator=g)[: int(quota[cls])]
        picked.append(members[perm])
    return torch.cat(picked).sort().values


def _lookup(name: str) -> tuple[Callable[[LoadRequest], ImageSet], str | None]:
    if not isinstance(name, str) or not name:
        raise BadInput(f"dataset name {name!r} is invalid; choose one of: {', '.join(dataset_names())}")
    head, colon, rest = name.partition(":")
    if colon:
        fn = _REGISTRY.get(head.lower() + ":")
        if fn is not None:
            if not rest:
                raise BadInput(f"dataset '{name}' needs a path after '{head}:', e.g. {head}:/data/my_images")
            return fn, rest
    else:
        fn = _REGISTRY.get(name.lower())  # names are case-insensitive: 'FashionMNIST' works
        if fn is not None:
            return fn, None
    raise BadInput(f"unknown dataset '{name}'; choose one of: {', '.join(dataset_names())}")


def load_dataset(
    name: str,
    split: str = "train",
    *,
    root: str | Path | None = None,
    resolution: int | None = None,
    channels: int | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> ImageSet:
    """Load a registered dataset as uint8 NCHW; optionally subsample and resize.

    `limit` keeps a class-stratified random subset (uniform when unlabelled),
    chosen by `seed`, in original order (see `choose_subset`). `resolution` /
    `channels` of None keep the native size / channel count.
    """
    fn, arg = _lookup(name)
    if split not in SPLITS:
        raise BadInput(f"split {split!r} is invalid; allowed: {', '.join(SPLITS)}")
    for param, value in (("resolution", resolution), ("limit", limit)):
        if value is not None:
            check_positive(param, value, integer=True)
    if channels is not None and channels not in (1, 3):
        raise BadInput(f"channels {channels!r} is invalid; allowed: 1, 3 or None")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise BadInput(f"seed {seed!r} is invalid; allowed: an integer")
    resolution = None if resolution is None else int(resolution)  # numpy ints -> plain ints
    limit = None if limit is None else int(limit)
    channels = None if channels is None else int(channels)
    req = LoadRequest(name, arg, split, data_root(root), resolution, channels, limit, int(seed))
    ds = fn(req)
    # Loaders may already have subsampled (via req.pick) and resized; both steps are idempotent.
    keep = req.pick(ds.labels, len(ds))
    if keep is not None:
        ds = ds.subset(keep)
    res = resolution
    ch = channels if channels is not None else int(ds.images.shape[1])
    if res is not None or ch != ds.images.shape[1]:
        if res is None:
            if ds.images.shape[2] != ds.images.shape[3]:
                # resize_images makes squares; keep non-square natives as they are.
                raise BadInput(
                    f"dataset '{name}' has non-square {ds.images.shape[2]}x{ds.images.shape[3]} images; "
                    "pass a resolution to change channels"
                )
            res = int(ds.images.shape[2])
        ds = _with_images(ds, resize_images(ds.images, res, ch))
    return ds


def _with_images(ds: ImageSet, images: torch.Tensor) -> ImageSet:
    return ImageSet(images, ds.labels, ds.num_classes, ds.name, ds.split, ds.source, ds.class_names)
