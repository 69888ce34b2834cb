import math

import numpy as np
import pytest
import torch

from dpsynth.errors import BadInput
from dpsynth.mechanisms.semantic_query import add_gaussian_noise, select_public_classes, semantic_histogram


def test_histogram_counts_rows_by_sensitive_class():
    topk = torch.tensor([[0, 2], [2, 1], [0, 1]])
    labels = torch.tensor([0, 1, 0])
    hist = semantic_histogram(topk, labels, num_rows=2, num_public_classes=3)
    assert hist.tolist() == [[2, 1, 1], [0, 1, 1]]
    assert semantic_histogram(topk, None, 1, 3).tolist() == [[2, 2, 2]]


@pytest.mark.parametrize("k", [1, 3, 5])
def test_removing_one_image_moves_the_histogram_by_sqrt_k(k):
    rng = np.random.default_rng(0)
    topk = torch.tensor(np.stack([rng.permutation(10)[:k] for _ in range(50)]))
    labels = torch.tensor(rng.integers(0, 4, 50))
    full = semantic_histogram(topk, labels, 4, 10)
    for i in range(50):
        keep = torch.arange(50) != i
        neighbour = semantic_histogram(topk[keep], labels[keep], 4, 10)
        assert np.linalg.norm(full - neighbour) == pytest.approx(math.sqrt(k))


def test_noise_has_zero_mean_and_std_sigma_sqrt_k():
    hist = np.full((3, 20), 7.0)
    sigma, k = 2.0, 4
    draws = np.stack([add_gaussian_noise(hist, sigma, k, np.random.default_rng(s)) for s in range(400)]) - hist
    assert abs(draws.mean()) < 0.05
    assert draws.std() == pytest.approx(sigma * math.sqrt(k), rel=0.03)


def test_default_noise_is_not_reproducible():
    hist = np.zeros((1, 5))
    assert not np.array_equal(add_gaussian_noise(hist, 1.0, 1), add_gaussian_noise(hist, 1.0, 1))


def test_selection_masks_classes_already_taken():
    noisy = np.array([[9.0, 8.0, 1.0, 0.0],
                      [9.5, 7.0, 6.0, 0.0]])   # both rows prefer class 0
    chosen = select_public_classes(noisy, 4)
    assert chosen[0] == (0, 0)
    assert chosen[1] == (1, 1)                 # row 1 cannot take class 0 again
    assert sorted(p for p, _ in chosen) == [0, 1, 2, 3]
    with pytest.raises(BadInput):
        select_public_classes(noisy, 5)
