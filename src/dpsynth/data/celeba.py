"""CelebA with the 'Male' attribute as a 2-class label (as DPImageBench does).

Parsed directly instead of via torchvision.datasets.CelebA: that class insists
on six annotation files plus their md5s, while only the images, the attribute
list and the split list are needed here.
"""

from __future__ import annotations

from pathlib import Path

from dpsynth.errors import BadInput

from .common import decode_files, labels_tensor, not_found
from .imageset import ImageSet
from .registry import LoadRequest, register_dataset

CROP = 140  # centre square of the 178x218 aligned faces, the usual DP-generation preprocessing
DEFAULT_RESOLUTION = 32  # natives are large; never keep them in memory uncropped
_PARTITION = {"train": "0", "test": "2"}  # torchvision's split codes (1 = valid, unused)


def _parse_partition(path: Path, split: str) -> list[str]:
    want = _PARTITION[split]
    with open(path) as fh:
        return [parts[0] for parts in (line.split() for line in fh) if len(parts) == 2 and parts[1] == want]


def _parse_male(path: Path) -> dict[str, int]:
    with open(path) as fh:
        fh.readline()  # image count
        col = fh.readline().split().index("Male")
        # Rows are "<file> <40 values of -1/1>": +1 for the file column.
        return {p[0]: int(p[col + 1] == "1") for p in (line.split() for line in fh) if p}


def load_celeba(req: LoadRequest) -> ImageSet:
    base = req.root / "celeba"
    imgs, attrs, parts = base / "img_align_celeba", base / "list_attr_celeba.txt", base / "list_eval_partition.txt"
    if not (imgs.is_dir() and attrs.is_file() and parts.is_file()):
        raise not_found(
            "celeba",
            f"torchvision's CelebA layout under {base}/ "
            "(img_align_celeba/, list_attr_celeba.txt, list_eval_partition.txt)",
        )
    files = _parse_partition(parts, req.split)
    male = _parse_male(attrs)
    unlabelled = [f for f in files if f not in male]
    if unlabelled:
        raise BadInput(
            f"CelebA file {attrs} has no attributes for {unlabelled[0]} ({len(unlabelled)} images lack them)"
        )
    labels = labels_tensor([male[f] for f in files])
    keep = req.pick(labels, len(files))  # subsample before decoding: 160k JPEGs are slow
    if keep is not None:
        files = [files[i] for i in keep.tolist()]
        labels = labels[keep].contiguous()
    images = decode_files([imgs / f for f in files], "RGB", req.resolution or DEFAULT_RESOLUTION, crop=CROP)
    source = f"CelebA at {base} (centre crop {CROP}, label = Male)"
    return ImageSet(images, labels, 2, req.name, req.split, source, ("female", "male"))


register_dataset("celeba", load_celeba)
