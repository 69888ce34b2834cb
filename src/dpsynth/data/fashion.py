"""Put Fashion-MNIST where torchvision looks for it, from the Debian package if present.

Debian's `dataset-fashion-mnist` ships the four idx files gzipped in
/usr/share/datasets/fashion-mnist/; torchvision wants them unpacked in
<root>/FashionMNIST/raw/. Unpacking is the only thing dpsynth ever writes
into the data root, and it is atomic so a killed run never leaves half a file.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
import zlib
from pathlib import Path

from dpsynth.errors import BadInput, DatasetNotFound

from .common import not_found, one_line
from .registry import data_root

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def raw_dir(root: str | Path | None = None) -> Path:
    return data_root(root) / "FashionMNIST" / "raw"


def missing_error(root: str | Path | None = None) -> DatasetNotFound:
    return not_found(
        "fashionmnist",
        f"torchvision's FashionMNIST layout under {raw_dir(root)}/ ({', '.join(RAW_FILES)}) "
        f"or Debian's dataset-fashion-mnist files in {DEBIAN_DIR}/",
        "or run: python -m dpsynth.data.provision fashionmnist",
    )


def _gunzip_atomic(src: Path, dst: Path) -> None:
    # Temp file in the destination dir so os.replace is a same-filesystem rename.
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    try:
        with gzip.open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def unpack_debian(root: str | Path | None = None) -> list[str]:
    """Gunzip whichever raw files are missing from the Debian copies; returns those unpacked.

    Does nothing (returns []) when all files are present or a Debian copy is absent.
    """
    raw = raw_dir(root)
    missing = [f for f in RAW_FILES if not (raw / f).is_file()]
    if not missing or not all((DEBIAN_DIR / f"{f}.gz").is_file() for f in missing):
        return []
    try:
        raw.mkdir(parents=True, exist_ok=True)
        for f in missing:
            _gunzip_atomic(DEBIAN_DIR / f"{f}.gz", raw / f)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # BadGzipFile is an OSError: test it first
        raise DatasetNotFound(one_line(f"Debian Fashion-MNIST files in {DEBIAN_DIR}/ are unreadable ({e})")) from e
    except OSError as e:
        msg = f"cannot unpack Fashion-MNIST into {raw}/ ({e}); choose a writable `data_root`"
        raise BadInput(one_line(msg)) from e
    return missing


def provision_fashionmnist(root: str | Path | None = None, *, download: bool = False) -> Path:
    """Ensure the raw files exist; returns the raw directory.

    Prefers the Debian files; with download=True falls back to torchvision's
    own downloader (the only place dpsynth touches the network).
    """
    unpack_debian(root)
    raw = raw_dir(root)
    if all((raw / f).is_file() for f in RAW_FILES):
        return raw
    if download:
        from torchvision.datasets import FashionMNIST

        try:
            for train in (True, False):
                FashionMNIST(str(data_root(root)), train=train, download=True)
        except Exception as e:  # network/urllib/md5 failures come in many types
            raise DatasetNotFound(one_line(f"downloading Fashion-MNIST into {raw}/ failed ({e})")) from e
        return raw
    raise missing_error(root)
