"""Tests for dpsynth.evaluation: classifiers, DP-safe utility, FID/KID via clean-fid.

References are independent of the code under test: the closed-form Fréchet
distance between Gaussians, argmax over the recorded accuracies, and an
audited test Dataset that logs every read.
"""

import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from dpsynth.errors import BadInput
from dpsynth.evaluation.classifiers import build_classifier
from dpsynth.evaluation.classifier_fit import classification_accuracy
from dpsynth.evaluation.fidelity import FeatureNetwork, inception_available, make_feature_network
from eval_helpers import compute_fidelity, evaluate_utility, fit_with_selection

RES = 16


def quadrant_images(n: int, seed: int, noise: float = 40.0):
    """Class k in 0..3 lights quadrant k; Gaussian pixel noise on top. Linearly separable."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    x = torch.full((n, 1, RES, RES), 60.0)
    h = RES // 2
    for k in range(4):
        r, c = divmod(k, 2)
        x[labels == k, :, r * h : (r + 1) * h, c * h : (c + 1) * h] = 190.0
    x += noise * torch.randn(x.shape, generator=g)
    return x.clamp(0, 255).round().to(torch.uint8), labels.long()


class AuditedTestSet(Dataset):
    """(image, label) pairs that append ("read", index) to a shared log on every access."""

    def __init__(self, images, labels, log):
        self.images, self.labels, self.log = images, labels, log

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, i):
        self.log.append(("read", i))
        return self.images[i], self.labels[i]


@pytest.fixture(scope="module")
def data():
    syn_x, syn_y = quadrant_images(600, seed=1)
    test_x, test_y = quadrant_images(200, seed=2)
    return syn_x, syn_y, test_x, test_y


FAST = dict(epochs=3, batch_size=64, seed=0)


# ---------------------------------------------------------------- utility


def test_dp_safe_reads_test_set_once_after_selection(data):
    syn_x, syn_y, test_x, test_y = data
    log = []
    audited = AuditedTestSet(test_x, test_y, log)
    result = evaluate_utility(
        syn_x, syn_y, audited, None, 4,
        progress=lambda phase, done, total: log.append((phase, done, total)), **FAST,
    )
    assert result.accuracy > 0.9
    assert result.to_dict()["dp_safe"] is True
    assert result.train_size + result.val_size == 600
    assert result.val_size == pytest.approx(600 / 12, abs=4)  # stratified rounding per class

    reads = [i for i, entry in enumerate(log) if entry[0] == "read"]
    fitting = [i for i, entry in enumerate(log) if entry[0].split()[0] in ("train", "validate")]
    assert fitting, "progress callback was never called during fitting"
    # Zero reads before fitting (training + selection) is over ...
    assert min(reads) > max(fitting)
    # ... then exactly one pass: every test item read exactly once (one checkpoint evaluated).
    assert sorted(log[i][1] for i in reads) == list(range(len(audited)))
    # Validation happened once per epoch.
    assert [e[1] for e in log if e[0] == "validate cnn"] == [1, 2, 3]


def test_selected_checkpoint_is_argmax_of_validation_and_is_what_was_tested():
    # Heavy noise on both sides so accuracies move from epoch to epoch and selection matters.
    noisy_x, noisy_y = quadrant_images(600, seed=3, noise=400.0)
    test_x, test_y = quadrant_images(200, seed=2, noise=400.0)
    settings = dict(FAST, epochs=4)
    result = evaluate_utility(noisy_x, noisy_y, test_x, test_y, 4, **settings)
    assert len(result.val_accuracies) == 4
    assert len(set(result.val_accuracies)) > 1
    assert result.selected_epoch == int(np.argmax(result.val_accuracies)) + 1

    # Re-fit deterministically (no test data passed in) and test the selected weights ourselves.
    fit = fit_with_selection(noisy_x, noisy_y, 4, **settings)
    assert fit.selection_accuracies == result.val_accuracies
    acc = classification_accuracy(fit.model, test_x, test_y, 4, image_shape=(1, RES, RES))
    assert acc == pytest.approx(result.accuracy)


def test_test_set_selection_is_flagged_not_dp_safe(data):
    syn_x, syn_y, test_x, test_y = data
    result = evaluate_utility(syn_x, syn_y, test_x, test_y, 4, protocol="test-set-selection", **FAST)
    d = result.to_dict()
    assert d["dp_safe"] is False
    assert d["protocol"] == "test-set-selection"
    # Same trajectory as the DP-safe protocol (synthetic-train split), selected on the test set instead.
    assert d["train_size"] + d["val_size"] == 600
    assert d["accuracy"] == max(d["val_accuracies"])


def test_cnn_shapes_and_registry():
    for channels, res in ((1, 28), (3, 32), (1, 16)):
        net = build_classifier("cnn", channels, 10, res)
        assert net(torch.zeros(2, channels, res, res)).shape == (2, 10)
    with pytest.raises(BadInput, match="cnn"):
        build_classifier("resnet-9000", 1, 10, 28)


def test_utility_bad_inputs(data):
    syn_x, syn_y, test_x, test_y = data
    with pytest.raises(BadInput, match="dp-safe-selection"):
        evaluate_utility(syn_x, syn_y, test_x, test_y, 4, protocol="best-of-test")
    with pytest.raises(BadInput, match="cnn"):
        evaluate_utility(syn_x, syn_y, test_x, test_y, 4, classifier="vgg")
    with pytest.raises(BadInput, match="599"):
        evaluate_utility(syn_x, syn_y[:599], test_x, test_y, 4)
    with pytest.raises(BadInput, match="199"):
        evaluate_utility(syn_x, syn_y, test_x, test_y[:199], 4)
    with pytest.raises(BadInput, match="label 3"):
        evaluate_utility(syn_x, syn_y, test_x, test_y, 3)
    with pytest.raises(BadInput, match="label -1"):
        evaluate_utility(syn_x, torch.full_like(syn_y, -1), test_x, test_y, 4)
    with pytest.raises(BadInput, match="empty"):
        evaluate_utility(syn_x[:0], syn_y[:0], test_x, test_y, 4)
    with pytest.raises(BadInput, match="uint8"):
        evaluate_utility(syn_x.float(), syn_y, test_x, test_y, 4)
    with pytest.raises(BadInput, match="test_labels must be None"):
        evaluate_utility(syn_x, syn_y, AuditedTestSet(test_x, test_y, []), test_y, 4)


def test_out_of_range_test_labels_rejected_at_final_read(data):
    syn_x, syn_y, test_x, test_y = data
    bad = test_y.clone()
    bad[5] = 9
    with pytest.raises(BadInput, match="label 9"):
        evaluate_utility(syn_x[:120], syn_y[:120], test_x, bad, 4, epochs=1, batch_size=64)


# ---------------------------------------------------------------- fidelity


def gaussian_pixel_images(n: int, mean: np.ndarray, seed: int):
    """Grey 4x4 images whose pixels are 100 + 10 * N(mean, I): an affine image of a Gaussian."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 16)) + mean
    pix = np.clip(np.round(100 + 10 * z), 0, 255).astype(np.uint8)
    return torch.from_numpy(pix.reshape(n, 1, 4, 4))


def affine_extractor(seen_shapes):
    def extract(x):
        seen_shapes.append(tuple(x.shape[1:]))
        return (x[:, 0].flatten(1) - 100.0) / 10.0  # back to the Gaussian's coordinates

    return extract


def cubic_kernel_mean(a: np.ndarray, b: np.ndarray) -> float:
    """E[(x.y/d + 1)^3] for independent x ~ N(a, I), y ~ N(b, I), from the moments of
    x.y = sum_i x_i y_i (independent terms: E w = a b, E w^2 = (1+a^2)(1+b^2), E w^3 = (a^3+3a)(b^3+3b))."""
    d = len(a)
    mu, ew2, ew3 = a * b, (1 + a**2) * (1 + b**2), (a**3 + 3 * a) * (b**3 + 3 * b)
    mean, var = mu.sum(), (ew2 - mu**2).sum()
    third = (ew3 - 3 * mu * ew2 + 2 * mu**3).sum()  # third central moment adds over independent terms
    ez2, ez3 = var + mean**2, third + 3 * mean * var + mean**3
    return ez3 / d**3 + 3 * ez2 / d**2 + 3 * mean / d + 1


def test_fid_and_kid_match_gaussian_closed_forms_and_self_is_zero():
    mu = np.full(16, 0.5)  # ||mu||^2 = 4
    a = gaussian_pixel_images(20000, np.zeros(16), seed=0)
    b = gaussian_pixel_images(20000, mu, seed=1)
    seen = []
    net = FeatureNetwork(name="affine-4px:test", extractor=affine_extractor(seen))

    shifted = compute_fidelity(a, b, net, batch_size=4096)
    # Same covariance, so FID = ||mu_a - mu_b||^2 = 4; sampling bias ~ d^2/n is far below 0.1.
    assert shifted["fid"] == pytest.approx(float(mu @ mu), abs=0.1)
    assert shifted["feature_network"] == "affine-4px:test"
    assert shifted["n_real"] == 20000 and shifted["n_fake"] == 20000
    assert set(seen) == {(3, 4, 4)}  # grey was repeated to clean-fid's 3-channel convention

    # KID: clean-fid's unbiased MMD^2 with k(x, y) = (x.y/d + 1)^3, against its population value.
    zero = np.zeros(16)
    kid_ref = cubic_kernel_mean(zero, zero) + cubic_kernel_mean(mu, mu) - 2 * cubic_kernel_mean(zero, mu)
    assert shifted["kid"] == pytest.approx(kid_ref, rel=0.06)  # subset-estimator spread measured ~2%

    same = compute_fidelity(a, a, net, batch_size=4096)
    assert abs(same["fid"]) < 1e-3 * shifted["fid"]
    assert abs(same["kid"]) < 1e-2 * shifted["kid"]
    assert shifted["kid"] > 0


def test_kid_is_reproducible_and_optional():
    a = gaussian_pixel_images(200, np.zeros(16), seed=0)
    b = gaussian_pixel_images(200, np.full(16, 0.3), seed=1)
    net = FeatureNetwork(name="affine-4px:test", extractor=affine_extractor([]))
    state = np.random.get_state()
    first = compute_fidelity(a, b, net)
    assert compute_fidelity(a, b, net)["kid"] == first["kid"]
    assert np.array_equal(np.random.get_state()[1], state[1])  # global RNG left as it was
    assert compute_fidelity(a, b, net, kid=False)["kid"] is None


class TinyFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 8, 3, padding=1)

    def forward(self, x):
        return torch.tanh(self.conv(x)).mean(dim=(2, 3))


def test_make_feature_network_wraps_module_and_resizes_through_clean_fid():
    module = TinyFeatures()
    net = make_feature_network(module, "tiny-8px:sha256:0000", input_channels=1, resolution=8, device="cpu")
    assert net.resolution == 8

    # Wrapper on clean-fid's input (3 grey channels, [0,255]) equals the module on [-1,1] grey.
    grey = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    expected = module(grey.float() / 127.5 - 1.0)
    got = net.extractor(grey.repeat(1, 3, 1, 1).float())
    assert torch.allclose(got, expected, atol=1e-4)

    # 16px images are resized by clean-fid's resizer to 8px before the module.
    real, _ = quadrant_images(300, seed=4)
    other, _ = quadrant_images(300, seed=5)
    blank = torch.full_like(real, 128)
    near = compute_fidelity(real, other, net, kid=False)
    far = compute_fidelity(real, blank + torch.randint_like(real, 0, 3), net, kid=False)
    assert near["feature_network"] == "tiny-8px:sha256:0000"
    assert far["fid"] > 10 * near["fid"]


def test_fidelity_bad_inputs():
    a = gaussian_pixel_images(10, np.zeros(16), seed=0)
    net = FeatureNetwork(name="affine-4px:test", extractor=affine_extractor([]))
    with pytest.raises(BadInput, match="at least 2"):
        compute_fidelity(a, a[:1], net)
    with pytest.raises(BadInput, match="uint8"):
        compute_fidelity(a.float(), a, net)
    with pytest.raises(BadInput, match="name"):
        compute_fidelity(a, a, FeatureNetwork(name="", extractor=affine_extractor([])))


def test_inception_available_only_reports_cache():
    expected = os.path.isfile("/tmp/inception-2015-12-05.pt")
    assert inception_available() is expected
    assert os.path.isfile("/tmp/inception-2015-12-05.pt") is expected  # nothing was downloaded
