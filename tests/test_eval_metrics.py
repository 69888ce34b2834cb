"""Tests for precision/recall (k-NN manifolds), the Inception Score formula and FLD.

References are independent of the code: hand-worked 1-D manifolds,
constructed cluster sets, scipy entropies (E KL(p(y|x)||p(y)) = H(p(y)) - E H(p(y|x))),
scipy Gaussian log-densities, and the closed-form single-Gaussian MLE.
"""

import math

import numpy as np
import pytest
import torch
from scipy.stats import entropy, multivariate_normal

from dpsynth.errors import BadInput
from dpsynth.evaluation.fld import fit_log_variances, fld, kde_test_nll, mixture_nll
from dpsynth.evaluation.inception_score import inception_score
from dpsynth.evaluation.manifold import precision_recall


def clusters(rng, centres, per_cluster, dim=16, spread=1.0):
    return np.concatenate([c + spread * rng.normal(size=(per_cluster, dim)) for c in centres])


# ------------------------------------------------------------ precision/recall


def test_identical_sets_have_full_precision_and_recall():
    x = np.random.default_rng(0).normal(size=(200, 16))
    assert precision_recall(x, x) == {"precision": 1.0, "recall": 1.0}


def test_far_apart_sets_have_zero_precision_and_recall():
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(150, 16)), 100.0 + rng.normal(size=(120, 16))
    assert precision_recall(real, fake) == {"precision": 0.0, "recall": 0.0}


def test_hand_worked_one_dimensional_manifolds():
    # k=1. Real radii: 0,1,2,3 -> 1 each; 10 -> 7 (its nearest other point is 3).
    # Fake 0.5, 2.9 lie in real balls, 5 lies in ball(10, 7), 20 does not -> precision 3/4.
    # Fake radii: 0.5 -> 2.4, 2.9 -> 2.1, 5 -> 2.1, 20 -> 15; every real point is covered
    # (10 only by the outlier's ball around 20) -> recall 1.
    real = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]])
    fake = np.array([[0.5], [5.0], [20.0], [2.9]])
    got = precision_recall(real, fake, k=1)
    assert got["precision"] == pytest.approx(0.75)
    assert got["recall"] == pytest.approx(1.0)


def test_fake_covering_half_the_modes():
    rng = np.random.default_rng(2)
    centres = [np.eye(16)[i] * 60.0 for i in range(4)]  # four modes 60 apart per axis
    real = clusters(rng, centres, 100)
    # Constructed: the fake set is exactly the real points of modes 0 and 1.
    exact = precision_recall(real, real[:200])
    assert exact == {"precision": 1.0, "recall": 0.5}


def test_fresh_samples_from_half_the_modes():
    # In 2-d, 200 points per mode give k-NN balls that cover fresh samples almost surely.
    rng = np.random.default_rng(3)
    centres = [np.array([60.0, 0.0]), np.array([0.0, 60.0]), np.array([-60.0, 0.0]), np.array([0.0, -60.0])]
    real = clusters(rng, centres, 200, dim=2)
    got = precision_recall(real, clusters(rng, centres[:2], 200, dim=2))
    assert got["precision"] >= 0.95
    assert 0.45 <= got["recall"] <= 0.5  # modes 2 and 3 are never reached


def test_chunking_does_not_change_the_result():
    rng = np.random.default_rng(9)
    real, fake = rng.normal(size=(90, 8)), 0.5 + rng.normal(size=(70, 8))
    assert precision_recall(real, fake, k=3, chunk=7) == precision_recall(real, fake, k=3)


def test_precision_recall_bad_input():
    x = np.zeros((4, 3))
    with pytest.raises(BadInput, match="at least 5"):
        precision_recall(x, np.ones((10, 3)), k=4)
    with pytest.raises(BadInput, match="dimensions differ"):
        precision_recall(np.ones((10, 3)), np.ones((10, 2)))
    with pytest.raises(BadInput, match="k must be"):
        precision_recall(np.ones((10, 3)), np.ones((10, 3)), k=0)


# ------------------------------------------------------------- inception score


def test_uniform_predictions_score_one():
    mean, std = inception_score(np.full((100, 10), 0.1), splits=10)
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.0, abs=1e-12)


def test_confident_and_balanced_predictions_score_num_classes():
    c = 7
    probs = np.tile(np.eye(c), (5, 1))  # each split of 7 rows holds each class once
    mean, std = inception_score(probs, splits=5)
    assert mean == pytest.approx(c) and std == pytest.approx(0.0, abs=1e-9)


def test_hand_example():
    # p(y) = (3/4, 1/4); KL rows: log(4/3) and 1/2 log(4/3) -> IS = (4/3)^(3/4)
    mean, std = inception_score(np.array([[1.0, 0.0], [0.5, 0.5]]), splits=1)
    assert mean == pytest.approx((4 / 3) ** 0.75) and std == 0.0


def test_matches_entropy_identity_over_splits():
    p = np.random.default_rng(4).dirichlet(np.full(5, 0.3), size=31)
    expected = [
        math.exp(entropy(part.mean(axis=0)) - np.mean([entropy(row) for row in part]))
        for part in np.array_split(p, 3)
    ]
    mean, std = inception_score(p, splits=3)
    assert mean == pytest.approx(np.mean(expected)) and std == pytest.approx(np.std(expected))


@pytest.mark.parametrize(
    "probs, splits, message",
    [
        (np.full((4, 3), 0.5), 1, "sum to 1"),
        (np.array([[1.5, -0.5], [0.5, 0.5]]), 1, "non-negative"),
        (np.full((4, 2), 0.5), 5, "splits must be"),
        (np.full(4, 0.25), 1, "shape"),
    ],
)
def test_inception_score_bad_input(probs, splits, message):
    with pytest.raises(BadInput, match=message):
        inception_score(probs, splits=splits)


# ------------------------------------------------------------------------ FLD


def test_single_centre_fit_is_the_closed_form_mle():
    # One Gaussian at mu: the MLE variance is mean ||x - mu||^2 / d.
    rng = np.random.default_rng(5)
    x = torch.tensor(rng.normal(size=(300, 4)) * 2.0)
    mu = torch.zeros(1, 4, dtype=torch.float64)
    log_var = fit_log_variances(mu, x)
    assert math.exp(log_var.item()) == pytest.approx((x.square().sum(1).mean() / 4).item(), rel=1e-9)


def test_mixture_nll_matches_scipy_density():
    rng = np.random.default_rng(6)
    centres, points = rng.normal(size=(3, 2)), rng.normal(size=(20, 2))
    variances = np.array([0.5, 1.0, 2.0])
    dens = sum(multivariate_normal(c, v * np.eye(2)).pdf(points) for c, v in zip(centres, variances)) / 3
    got = mixture_nll(torch.tensor(points), torch.tensor(centres), torch.tensor(np.log(variances)))
    assert got == pytest.approx(-np.log(dens).mean() / 2, rel=1e-9)


def test_em_fit_is_a_local_maximum_of_train_likelihood():
    rng = np.random.default_rng(7)
    centres, x = torch.tensor(rng.normal(size=(30, 3))), torch.tensor(rng.normal(size=(200, 3)))
    log_var = fit_log_variances(centres, x, iterations=500, tol=0.0)
    best = mixture_nll(x, centres, log_var)
    for direction in torch.eye(30)[:5]:
        for step in (-0.05, 0.05):
            assert mixture_nll(x, centres, log_var + step * direction) >= best - 1e-12


def fld_data(seed=8, dim=8):
    rng = np.random.default_rng(seed)
    return rng, rng.normal(size=(400, dim)), rng.normal(size=(400, dim))


def test_fld_grows_monotonically_with_shift():
    rng, train, test = fld_data()
    scores = [fld(train, test, rng.normal(size=(200, 8)) + shift) for shift in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert all(a < b for a, b in zip(scores, scores[1:])), scores
    assert abs(scores[0]) < 5  # fresh samples from the real distribution score close to the baseline


def test_fld_penalises_copied_training_points():
    # FLD measures generalisation: near-copies of train points get tiny bandwidths, so
    # held-out test points become unlikely. They beat a far-off distribution, not fresh samples.
    rng, train, test = fld_data()
    copies = train[rng.choice(400, 200, replace=False)] + 1e-3 * rng.normal(size=(200, 8))
    fresh = fld(train, test, rng.normal(size=(200, 8)))
    copied = fld(train, test, copies)
    far = fld(train, test, rng.normal(size=(200, 8)) + 2.0)
    assert fresh < copied < far


def test_fld_is_deterministic_and_nll_is_per_dimension():
    rng, train, test = fld_data()
    fake = rng.normal(size=(100, 8))
    assert fld(train, test, fake) == fld(train, test, fake)
    # A standard normal's entropy per dimension is 0.5 log(2 pi e) ~ 1.419; a KDE is a bit worse.
    assert 1.3 < kde_test_nll(train, test, fake) < 2.0


def test_fld_bad_input():
    x = np.zeros((10, 3))
    with pytest.raises(BadInput, match="dimensions differ"):
        fld(x, x, np.zeros((10, 2)))
    with pytest.raises(BadInput, match="N >= 2"):
        fld(np.zeros((1, 3)), x, x)
    with pytest.raises(BadInput, match="finite"):
        fld(x, x, np.full((5, 3), np.nan))
