"""FID and KID through clean-fid, on a named feature network.

Inception-v3 (clean-fid's torchscript weights) is used when its file is on disk;
it cannot be fetched on an offline machine, so otherwise distances are computed
on a domain feature network passed in by the caller. The network's name travels
with every figure: a number from another network is not comparable to Inception
FID, and a report must never present it as such.

clean-fid is used for what it defines: its resizer (PIL bicubic on float
channels, the "clean" mode filter), its batch feature extraction, and its
`frechet_distance` / `kernel_distance`. Its folder-reading front end is
bypassed because our images are already in memory as uint8 tensors; the batch
we build matches what its `ResizeDataset` yields (float32 RGB in [0, 255]).
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from cleanfid import fid as cleanfid_fid
from cleanfid.resize import make_resizer

from dpsynth.errors import BadInput
from dpsynth.evaluation.checks import check_images
from dpsynth.validation import check_positive

Progress = Callable[[str, int, int], None]

# Where clean-fid 0.1.x keeps its torchscript Inception (hard-coded in
# cleanfid.features.feature_extractor); it downloads there when the file is missing.
_INCEPTION_FILE = "inception-2015-12-05.pt"


INCEPTION_FILE = _INCEPTION_FILE
INCEPTION = "inception"
DOMAIN = "domain"


@dataclass
class FeatureNetwork:
    name: str  # identity stored with every figure, e.g. "querynet-mnist5k-28px:sha256:abcd1234"
    extractor: Callable[[torch.Tensor], torch.Tensor]  # float (N,3,H,W) in [0,255] -> (N,D)
    resolution: int | None = None  # clean-fid resize target; None keeps the images' own size
    # Same input -> (N, C) class probabilities, for the Inception Score; None: no IS on this network.
    probabilities: Callable[[torch.Tensor], torch.Tensor] | None = None
    kind: str = DOMAIN  # INCEPTION only for clean-fid's Inception-v3 weights


def inception_network(weights: str | os.PathLike, device: str | torch.device = "cpu") -> FeatureNetwork:
    """clean-fid's Inception-v3 (its "clean" mode: PIL-bicubic resize to 299, pool3 features) from a local
    copy of its torchscript file, which must keep clean-fid's name. Never downloads."""
    path = os.path.abspath(os.fspath(weights))
    if os.path.basename(path) != _INCEPTION_FILE:
        raise BadInput(f"inception_weights={weights} must be clean-fid's file named {_INCEPTION_FILE}")
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        raise BadInput(f"inception_weights={weights} does not exist or is empty; give the path of {_INCEPTION_FILE}")
    from cleanfid.inception_torchscript import InceptionV3W

    device = torch.device(device)
    try:
        model = InceptionV3W(os.path.dirname(path), download=False, resize_inside=False).to(device).eval()
    except (RuntimeError, ValueError) as exc:
        raise BadInput(f"inception_weights={weights} is not a loadable torchscript Inception ({exc})") from None

    def probabilities(batch: torch.Tensor) -> torch.Tensor:
        # The torchscript net's classifier output (1008 classes) without its softmax bias, as the
        # original Inception Score code computes it (StyleGAN2-ADA's metrics use the same call).
        with torch.no_grad():
            return model.base(batch.to(device), no_output_bias=True).float()

    digest = _sha256_prefix(path)
    return FeatureNetwork(name=f"inception-v3(clean-fid,{_INCEPTION_FILE}):sha256:{digest}", extractor=model,
                          resolution=299, probabilities=probabilities, kind=INCEPTION)


def _sha256_prefix(path: str) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def _clean_fid_folder() -> str:
    return "./" if platform.system() == "Windows" else "/tmp"


def inception_available() -> bool:
    """True when clean-fid's Inception weights are already on disk; never downloads."""
    return find_inception_weights() is not None


def find_inception_weights(explicit: str | os.PathLike | None = None, search: tuple = ()) -> str | None:
    """`explicit` if given (checked when loaded), else the first non-empty copy of clean-fid's file in its
    own download folder or in `search` folders (e.g. dpsynth's model cache); None when there is none."""
    if explicit:
        return os.fspath(explicit)
    for folder in (_clean_fid_folder(), *map(os.fspath, search)):
        path = os.path.join(folder, _INCEPTION_FILE)
        if os.path.isfile(path) and os.path.getsize(path) > 0:
            return path
    return None


def make_feature_network(
    module: nn.Module, name: str, input_channels: int, resolution: int, device: str | torch.device = "cpu",
    classifier: nn.Module | None = None,
) -> FeatureNetwork:
    """Wrap `module` (normalised [-1,1] images -> features) in clean-fid's [0,255] RGB convention.

    `classifier` (same input -> logits), when given, provides the class probabilities of an
    Inception Score on this network. Modules are moved to `device` and run in eval mode.
    """
    if input_channels not in (1, 3):
        raise BadInput(f"input_channels must be 1 or 3, got {input_channels}")
    check_positive("resolution", resolution, integer=True)
    if not name:
        raise BadInput("feature network name must be non-empty; it labels every FID/KID figure")
    device = torch.device(device)
    module = module.to(device)
    if classifier is not None:
        classifier = classifier.to(device)

    def prepare(batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(device=device, dtype=torch.float32)
        if input_channels == 1:
            # ITU-R 601 luma (PIL's "L"); returns the original value for repeated grey channels.
            x = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
        if tuple(x.shape[-2:]) != (resolution, resolution):
            # Normally clean-fid has resized already; this only guards direct calls.
            x = F.interpolate(x, size=(resolution, resolution), mode="bicubic", align_corners=False, antialias=True)
            x = x.clamp(0.0, 255.0)
        return x / 127.5 - 1.0

    def extract(batch: torch.Tensor) -> torch.Tensor:
        module.eval()
        with torch.no_grad():
            return module(prepare(batch)).flatten(1).float()

    def probabilities(batch: torch.Tensor) -> torch.Tensor:
        classifier.eval()
        with torch.no_grad():
            return torch.softmax(classifier(prepare(batch)).float(), dim=1)

    return FeatureNetwork(name=name, extractor=extract, resolution=resolution,
                          probabilities=probabilities if classifier is not None else None)


def _as_clean_fid_batch(images: torch.Tensor, resizer, device: torch.device) -> torch.Tensor:
    """uint8 (N,C,H,W) -> float32 RGB (N,3,H',W') in [0,255] on `device`, as clean-fid's ResizeDataset
    yields. Its resize (PIL bicubic, part of clean-fid's definition) runs image by image on the CPU;
    without one, the uint8 batch moves to the device as it is (a quarter of the float bytes)."""
    if resizer is None:
        images = images.to(device)
        return (images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images).float()
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    hwc = images.cpu().permute(0, 2, 3, 1).numpy()
    resized = [torch.from_numpy(np.ascontiguousarray(resizer(img))).permute(2, 0, 1) for img in hwc]
    return torch.stack(resized).to(device).float()


def _features(images, net: FeatureNetwork, device, batch_size, progress, phase, fn=None) -> np.ndarray:
    size = net.resolution
    needs_resize = size is not None and tuple(images.shape[-2:]) != (size, size)
    resizer = make_resizer("PIL", False, "bicubic", (size, size)) if needs_resize else None
    n = images.shape[0]
    total = -(-n // batch_size)
    chunks = []
    for done, start in enumerate(range(0, n, batch_size), start=1):
        batch = _as_clean_fid_batch(images[start : start + batch_size], resizer, device)
        feats = cleanfid_fid.get_batch_features(batch, fn or net.extractor, device)
        chunks.append(feats.reshape(feats.shape[0], -1))
        if progress is not None:
            progress(phase, done, total)
    feats = np.concatenate(chunks).astype(np.float64)
    if feats.shape[0] != n:
        raise BadInput(f"feature network {net.name!r} returned {feats.shape[0]} rows for {n} images")
    if not np.isfinite(feats).all():
        raise BadInput(f"feature network {net.name!r} produced non-finite features")
    return feats


def _frechet(real: np.ndarray, fake: np.ndarray) -> float:
    mu1, sigma1 = real.mean(axis=0), np.cov(real, rowvar=False)
    mu2, sigma2 = fake.mean(axis=0), np.cov(fake, rowvar=False)
    # clean-fid prints its singular-covariance notice; keep stdout clean for the CLI.
    # Its sqrtm(..., disp=False) call also trips a SciPy>=1.17 deprecation that is not ours to fix.
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*`disp` argument is deprecated", category=DeprecationWarning)
        value = cleanfid_fid.frechet_distance(mu1, sigma1, mu2, sigma2)
    if captured.getvalue().strip():
        warnings.warn(captured.getvalue().strip(), RuntimeWarning, stacklevel=3)
    return float(value)


def _kernel(real: np.ndarray, fake: np.ndarray, seed: int) -> float:
    # kernel_distance draws subsets from NumPy's global RNG: seed it for
    # reproducible figures, then restore it so callers' streams are unaffected.
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        return float(cleanfid_fid.kernel_distance(real, fake))
    finally:
        np.random.set_state(state)


def fid_from_features(real: np.ndarray, fake: np.ndarray) -> float:
    """clean-fid's Frechet distance between the Gaussians fitted to two (N, D) feature sets."""
    return _frechet(np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64))


def kid_from_features(real: np.ndarray, fake: np.ndarray, seed: int = 0) -> float:
    """clean-fid's kernel distance (cubic polynomial-kernel MMD^2, subset-averaged), seeded."""
    return _kernel(np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64), seed)


def extract_probabilities(images: torch.Tensor, feature_net: FeatureNetwork, *, device: str | torch.device = "cpu",
                          batch_size: int = 256, progress: Progress | None = None,
                          phase: str = "class-probabilities") -> np.ndarray:
    """(N, C) class probabilities from the network's classifier, through the same clean-fid batches."""
    if feature_net.probabilities is None:
        raise BadInput(f"feature network {feature_net.name!r} has no classifier for the Inception Score")
    check_images(images, phase)
    return _features(images, feature_net, torch.device(device), batch_size, progress, phase,
                     fn=feature_net.probabilities)


def extract_features(images: torch.Tensor, feature_net: FeatureNetwork, *, device: str | torch.device = "cpu",
                     batch_size: int = 256, progress: Progress | None = None, phase: str = "features") -> np.ndarray:
    """Features of uint8 images through clean-fid's batch pipeline (for metrics beyond FID/KID)."""
    check_images(images, phase)
    return _features(images, feature_net, torch.device(device), batch_size, progress, phase)
