"""The semantic query's flat-histogram check (post-processing of the noisy release): rows whose votes
fall uniformly over the public classes are called flat at about the stated rate, rows with a fitting
class are not. References: simulated uniform and concentrated votes, the chi-square quantile."""

import numpy as np
import torch

from dpsynth.mechanisms.semantic_query import add_gaussian_noise, flat_rows, semantic_histogram


def noisy_histogram(topk, labels, rows, classes, sigma, k, rng):
    return add_gaussian_noise(semantic_histogram(topk, labels, rows, classes), sigma, k, rng)


def test_uniform_votes_are_flat_at_the_stated_rate_and_a_fitting_class_is_not():
    rng = np.random.default_rng(0)
    classes, per_row, sigma = 10, 500, 5.0
    uniform_flags = concentrated_flags = 0
    trials = 300
    for _ in range(trials):
        # Uniform: the public classifier's votes carry nothing about the (single-row) sensitive set.
        topk = torch.from_numpy(rng.integers(0, classes, size=(per_row, 1)))
        uniform_flags += flat_rows(noisy_histogram(topk, None, 1, classes, sigma, 1, rng), sigma, 1) == [0]
        # A fitting class: 30% of the votes go to class 3, the rest uniformly.
        fits = torch.from_numpy(np.where(rng.random(per_row) < 0.3, 3, rng.integers(0, classes, per_row)))
        concentrated_flags += flat_rows(noisy_histogram(fits.view(-1, 1), None, 1, classes, sigma, 1, rng),
                                        sigma, 1) == [0]
    assert uniform_flags / trials >= 0.97  # called flat unless chance says otherwise (alpha = 1%)
    assert concentrated_flags == 0


def test_rows_are_judged_separately_with_top_k_votes():
    rng = np.random.default_rng(1)
    labels = torch.arange(2).repeat_interleave(400)
    # Row 0 votes uniformly (2 distinct classes per image), row 1 always for classes 0 and 1.
    uniform = np.stack([rng.choice(10, size=2, replace=False) for _ in range(400)])
    topk = torch.from_numpy(np.concatenate([uniform, np.tile([0, 1], (400, 1))]))
    noisy = noisy_histogram(topk, labels, 2, 10, 2.0, 2, rng)
    assert flat_rows(noisy, 2.0, 2) == [0]


def test_heavy_noise_makes_any_histogram_flat():
    # At sigma 1000 the release says nothing: even a perfectly concentrated row cannot be told apart.
    rng = np.random.default_rng(2)
    topk = torch.zeros(200, 1, dtype=torch.long)
    assert flat_rows(noisy_histogram(topk, None, 1, 10, 1000.0, 1, rng), 1000.0, 1) == [0]


def test_a_flat_release_selects_no_class_and_pretrains_on_the_whole_public_set(tmp_path):
    # sklearn's digits as the user's own small set, Fashion-MNIST's domain nowhere; at sigma 3000 the
    # release is pure noise, so the stage must not pretend a selection and says what it does instead.
    from dpsynth.pipeline.common import DataSettings
    from dpsynth.pipeline.select_public import run_select_public

    settings = DataSettings(sensitive="digits", public="mnist5k", resolution=8, seed=0)
    result = run_select_public(tmp_path / "run", settings, sigma=3000.0, method="privimage-cvae")
    assert "flat" in result["warning"] and "whole public set" in result["warning"]
    assert sorted(s["public_class"] for s in result["selected"]) == list(range(10))
    assert result["public_fraction"] == 1.0
