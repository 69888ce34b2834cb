"""User-supplied .npz arrays (`npz:PATH`) and the npz-packaged Camelyon split.

The file is untrusted input: loaded with allow_pickle=False and validated
field by field so every problem is reported as one line naming the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dpsynth.errors import BadInput, DatasetNotFound

from .common import NO_DISJOINT_TEST, labels_tensor, not_found, one_line, to_nchw
from .imageset import ImageSet
from .registry import LoadRequest, register_dataset

_IMAGE_KEYS = ("images", "x")
_LABEL_KEYS = ("labels", "y")


def _read_arrays(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:  # zip, npy-header and pickle-refusal errors come in many types
        raise BadInput(one_line(f"npz file {path} is not a readable .npz ({type(e).__name__}: {e})")) from e
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise BadInput(f"npz file {path} is a single .npy array; expected an .npz archive with an 'images' array")
    with z:
        keys = set(z.files)
        ikey = next((k for k in _IMAGE_KEYS if k in keys), None)
        if ikey is None:
            found = ", ".join(sorted(keys)) or "nothing"
            raise BadInput(f"npz file {path} has no 'images' (or 'x') array; found: {found}")
        lkey = next((k for k in _LABEL_KEYS if k in keys), None)
        try:
            # Members decompress lazily, so a truncated archive may only fail here.
            return z[ikey], (z[lkey] if lkey else None)
        except Exception as e:
            raise BadInput(one_line(f"npz file {path} is not a readable .npz ({type(e).__name__}: {e})")) from e


def _images_layout(path: Path, shape: tuple[int, ...]) -> str:
    """Pick NHW / NHWC / NCHW; a size-1/3 axis 1 wins ties (torch's convention)."""
    if len(shape) == 3:
        return "NHW"
    if len(shape) != 4:
        raise BadInput(
            f"npz file {path}: images have shape {shape}; allowed (N,H,W), (N,H,W,C) or (N,C,H,W) with C in 1, 3"
        )
    if shape[1] in (1, 3):
        return "NCHW"
    if shape[3] in (1, 3):
        return "NHWC"
    raise BadInput(f"npz file {path}: images have shape {shape}; no channel axis of size 1 or 3 (first or last)")


def _to_uint8(path: Path, images: np.ndarray) -> np.ndarray:
    if images.dtype == np.uint8:
        return images
    if np.issubdtype(images.dtype, np.floating):
        # Floats are accepted only as [0, 1] intensities: anything else is ambiguous.
        if images.size and not (np.isfinite(images).all() and images.min() >= 0.0 and images.max() <= 1.0):
            raise BadInput(f"npz file {path}: float images must lie in [0, 1]; got values outside it (or NaN/inf)")
        return np.rint(images.astype(np.float64) * 255.0).astype(np.uint8)
    raise BadInput(f"npz file {path}: images dtype {images.dtype} is not allowed; use uint8, or float in [0, 1]")


def _check_labels(path: Path, labels: np.ndarray, n: int, num_classes: int | None) -> np.ndarray:
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]  # tolerate (N, 1) column vectors
    if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise BadInput(f"npz file {path}: labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if labels.shape[0] != n:
        raise BadInput(f"npz file {path}: {labels.shape[0]} labels for {n} images; counts must match")
    labels = labels.astype(np.int64)
    if labels.min() < 0:
        raise BadInput(f"npz file {path}: label {int(labels.min())} is negative; labels must be 0..K-1")
    if num_classes is not None and labels.max() >= num_classes:
        raise BadInput(f"npz file {path}: label {int(labels.max())} out of range; allowed 0..{num_classes - 1}")
    return labels


def read_npz(
    path: Path, name: str, split: str, num_classes: int | None = None, class_names: tuple[str, ...] = ()
) -> ImageSet:
    """Validated ImageSet from an .npz; num_classes None = max label + 1."""
    if not path.is_file():
        raise DatasetNotFound(
            f"npz file {path} not found; expected an .npz with an 'images' array and optional 'labels'"
        )
    images, labels = _read_arrays(path)
    layout = _images_layout(path, images.shape)
    images = _to_uint8(path, images)
    n = images.shape[0]
    if n == 0 or 0 in images.shape:
        raise BadInput(f"npz file {path}: images array {images.shape} is empty; need at least one image")
    tensor = to_nchw(images, layout)
    lab = None
    k = 0
    if labels is not None:
        checked = _check_labels(path, labels, n, num_classes)
        lab = labels_tensor(checked)
        k = num_classes if num_classes is not None else int(checked.max()) + 1
    return ImageSet(tensor, lab, k, name, split, f"npz file {path}", class_names if lab is not None else ())


def load_npz(req: LoadRequest) -> ImageSet:
    """`npz:PATH`: one file serves both splits (nothing is held out)."""
    return read_npz(Path(req.arg).expanduser(), req.name, req.split)


def load_camelyon(req: LoadRequest) -> ImageSet:
    base = req.root / "camelyon"
    path = base / f"{req.split}.npz"
    if not path.is_file():
        raise not_found(
            "camelyon",
            f"{base}/train.npz and {base}/test.npz, each with arrays 'images' (uint8 NHWC or NCHW) "
            "and 'labels' (0 = normal, 1 = tumour)",
        )
    return read_npz(path, req.name, req.split, num_classes=2, class_names=("normal", "tumour"))


register_dataset("npz:", load_npz)
NO_DISJOINT_TEST.add("npz:")
register_dataset("camelyon", load_camelyon)
