"""Helpers shared by the loaders: one-line errors, array conversion, image decoding."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dpsynth.errors import BadInput, DatasetNotFound

from .imageset import resize_images
from .registry import LoadRequest

ROOT_HINT = "set `data_root` or DPSYNTH_DATA"

# Names (and 'prefix:' forms) whose 'test' split is not disjoint from 'train': the loader serves one
# source as both splits, or refuses 'test'. Test accuracy on them needs a separate test set.
NO_DISJOINT_TEST: set[str] = set()


def has_disjoint_test(name: str) -> bool:
    """Whether dataset `name` has a test split that shares no source with its train split."""
    head, colon, _ = str(name).partition(":")
    return (head.lower() + ":" if colon else head.lower()) not in NO_DISJOINT_TEST


def one_line(text: object) -> str:
    """Collapse whitespace: library messages can span lines, ours must not."""
    return " ".join(str(text).split())


def not_found(name: str, expected: str, extra: str = "") -> DatasetNotFound:
    tail = f"; {extra}" if extra else ""
    return DatasetNotFound(one_line(f"dataset '{name}' not found: expected {expected}; {ROOT_HINT}{tail}"))


def only_train(req: LoadRequest) -> None:
    """For datasets that ship a single split: refuse 'test' rather than leak train data into it."""
    if req.split != "train":
        raise BadInput(
            f"dataset '{req.name}' has only a train split; split {req.split!r} is not available (use 'train')"
        )


def to_nchw(array: np.ndarray, layout: str) -> torch.Tensor:
    """uint8 numpy in NHW / NHWC / NCHW -> contiguous uint8 torch NCHW."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    if layout == "NHW":
        t = t.unsqueeze(1)
    elif layout == "NHWC":
        t = t.permute(0, 3, 1, 2)
    return t.contiguous()


def labels_tensor(values) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.int64)).contiguous()


def decode_files(
    paths: Sequence[str | Path],
    mode: str,
    resolution: int | None,
    crop: int | None = None,
) -> torch.Tensor:
    """Decode image files to uint8 NCHW in `mode` ('L' or 'RGB').

    Each image is optionally center-cropped to `crop` and resized to
    `resolution` as soon as it is decoded, so big natives never pile up in memory.
    Without a resolution all images must share one size.
    """
    channels = 1 if mode == "L" else 3
    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im = im.convert(mode)
                if crop is not None:
                    w, h = im.size
                    left, top = (w - crop) // 2, (h - crop) // 2
                    im = im.crop((left, top, left + crop, top + crop))
                arr = np.asarray(im, dtype=np.uint8)
        except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
            raise BadInput(one_line(f"image file {p} is unreadable ({e})")) from e
        t = torch.from_numpy(arr.reshape(arr.shape[0], arr.shape[1], channels).copy()).permute(2, 0, 1).unsqueeze(0)
        if resolution is not None:
            t = resize_images(t, resolution, channels)
        elif out and t.shape != out[0].shape:
            raise BadInput(
                f"image {p} is {t.shape[3]}x{t.shape[2]} but {paths[0]} is {out[0].shape[3]}x{out[0].shape[2]}; "
                "pass a resolution to resize them to one size"
            )
        out.append(t)
    if not out:
        return torch.empty((0, channels, resolution or 0, resolution or 0), dtype=torch.uint8)
    return torch.cat(out).contiguous()
