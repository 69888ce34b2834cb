"""shard_gaussian (GS-WGAN's persistent shards): the ledger's epsilon against a closed-form
binomial mixture and Monte Carlo estimates computed apart from the accountant, and the
reference values of issue 11 (index sequence public)."""

import math

import numpy as np
import pytest

from dpsynth.errors import BadInput
from dpsynth.privacy.accountant import compose_epsilon, default_delta, epsilon_upper, rdp_epsilon
from dpsynth.privacy.plans import calibrate_shard_gaussian
from dpsynth.privacy.events import GaussianEvent, PoissonGaussianEvent, ShardGaussianEvent, event_from_dict
from shard_closed_form import shard_gaussian_delta, shard_gaussian_epsilon

SMALL_DELTA = default_delta(6000)       # the small recipes: 6,000 images
PUBLISHED_DELTA = default_delta(60000)  # GS-WGAN/DPImageBench on Fashion-MNIST


@pytest.mark.parametrize("sigma,shards,steps,delta", [
    (1.1055, 10, 300, SMALL_DELTA), (2.85, 10, 300, SMALL_DELTA), (3.0, 1000, 5000, 1e-6), (0.7, 4, 40, 1e-3),
])
def test_single_event_matches_the_closed_form_mixture(sigma, shards, steps, delta):
    exact = shard_gaussian_epsilon(delta, sigma, shards, steps)
    bounds = compose_epsilon([ShardGaussianEvent("finetune", sigma, shards, steps)], delta)
    assert bounds.accountant == "prv"
    assert bounds.upper >= exact - 1e-6        # never under-counts
    assert bounds.upper - exact < 0.03         # and is tight
    assert bounds.lower <= exact + 1e-6


def test_one_shard_is_the_t_fold_gaussian():
    delta = 1e-5
    shard = epsilon_upper([ShardGaussianEvent("f", 6.0, 1, 25)], delta)
    gauss = epsilon_upper([GaussianEvent("f", 6.0, steps=25)], delta)
    assert shard == pytest.approx(gauss, abs=0.02)


def test_composes_with_a_gaussian_like_the_closed_form():
    # A Gaussian of multiplier s0 composed with the mixture: mu_K^2 = K / sigma^2 + 1 / s0^2.
    delta = 1e-5
    exact = shard_gaussian_epsilon(delta, 2.0, 20, 400, mu0=1 / 3.0)
    ours = epsilon_upper([GaussianEvent("select-public", 3.0), ShardGaussianEvent("finetune", 2.0, 20, 400)], delta)
    assert exact - 1e-6 <= ours <= exact + 0.04


def test_split_events_compose_to_the_summed_steps():
    # Independent shard draws: Bin(T1, p) + Bin(T2, p) = Bin(T1 + T2, p), so grouping by summing steps is exact.
    delta = 1e-5
    split = epsilon_upper([ShardGaussianEvent("a", 2.0, 10, 120), ShardGaussianEvent("b", 2.0, 10, 180)], delta)
    whole = epsilon_upper([ShardGaussianEvent("a", 2.0, 10, 300)], delta)
    assert split == pytest.approx(whole, abs=1e-9)
    assert whole >= shard_gaussian_epsilon(delta, 2.0, 10, 300) - 1e-6


def _dominating_pair_delta_mc(eps, sigma, shards, steps, n, rng, reverse=False):
    """Hockey-stick divergence of the pair (K visible, N(sqrt(K)/sigma, 1)) vs (K, N(0, 1)), sampled."""
    mu = np.sqrt(rng.binomial(steps, 1.0 / shards, size=n)) / sigma
    if reverse:  # Q against P: sample under Q, loss log(q/p) = -(mu y - mu^2/2)
        y = rng.standard_normal(n)
        loss = -(mu * y - mu ** 2 / 2)
    else:
        y = mu + rng.standard_normal(n)
        loss = mu * y - mu ** 2 / 2
    terms = np.maximum(1.0 - np.exp(eps - loss), 0.0)
    return terms.mean(), terms.std() / math.sqrt(n)


@pytest.mark.parametrize("reverse", [False, True])
def test_monte_carlo_of_the_dominating_pair_agrees_in_both_directions(reverse):
    rng = np.random.default_rng(11)
    sigma, shards, steps, delta = 1.5, 10, 200, 1e-3
    eps = compose_epsilon([ShardGaussianEvent("f", sigma, shards, steps)], delta).upper
    mc, se = _dominating_pair_delta_mc(eps, sigma, shards, steps, 2_000_000, rng, reverse)
    assert mc <= delta + 4 * se                                              # the ledger's eps holds
    exact = shard_gaussian_delta(eps - 0.5, sigma, shards, steps)
    mc_below, se_below = _dominating_pair_delta_mc(eps - 0.5, sigma, shards, steps, 2_000_000, rng, reverse)
    assert mc_below == pytest.approx(exact, abs=5 * se_below)                # and the closed form is its curve


@pytest.mark.parametrize("reverse", [False, True])
def test_hidden_shard_toy_mechanism_is_below_the_bound(reverse):
    """The mechanism the bound is for: T steps, public shard index k_t, the image's shard s
    uniform and secret; with the image, step t outputs 1[k_t = s] / sigma + N(0, 1), without
    it N(0, 1). Its sampled delta(eps) is at most the bound, in both directions."""
    rng = np.random.default_rng(5)
    sigma, shards, steps, n = 1.0, 5, 30, 200_000
    k = rng.integers(0, shards, size=(n, steps))
    s = rng.integers(0, shards, size=(n, 1))
    y = rng.standard_normal((n, steps)) + (0.0 if reverse else (k == s) / sigma)
    increments = y / sigma - 1 / (2 * sigma ** 2)
    per_shard = np.stack([np.where(k == j, increments, 0.0).sum(1) for j in range(shards)], axis=1)
    loss = np.logaddexp.reduce(per_shard, axis=1) - math.log(shards)  # log p_with(y) / p_without(y)
    loss = -loss if reverse else loss
    for eps in (1.0, 2.0, 3.0):
        terms = np.maximum(1.0 - np.exp(eps - loss), 0.0)
        bound = shard_gaussian_delta(eps, sigma, shards, steps)
        assert terms.mean() <= bound + 4 * terms.std() / math.sqrt(n)


def test_small_recipe_reference_values():
    # issue 11: N 6,000, N_d 10, T 300 at the old calibration's sigma_eff 1.1055 is really ~36.6.
    new = compose_epsilon([ShardGaussianEvent("finetune", 1.1055, 10, 300)], SMALL_DELTA)
    old = compose_epsilon([PoissonGaussianEvent("finetune", 1.1055, 0.1, 300)], SMALL_DELTA)
    assert new.upper == pytest.approx(36.6, abs=0.1) and old.upper <= 10.0
    sigma = calibrate_shard_gaussian([], 10.0, SMALL_DELTA, shards=10, steps=300)
    assert sigma == pytest.approx(2.85, rel=0.01)
    assert epsilon_upper([ShardGaussianEvent("finetune", sigma, 10, 300)], SMALL_DELTA) <= 10.0
    assert epsilon_upper([ShardGaussianEvent("finetune", sigma * 0.995, 10, 300)], SMALL_DELTA) > 10.0  # smallest


def test_calibration_counts_what_the_ledger_already_spent():
    spent = [GaussianEvent("select-public", 3.0)]
    sigma = calibrate_shard_gaussian(spent, 5.0, 1e-5, shards=20, steps=400)
    assert epsilon_upper([*spent, ShardGaussianEvent("f", sigma, 20, 400)], 1e-5) <= 5.0
    assert shard_gaussian_epsilon(1e-5, sigma, 20, 400, mu0=1 / 3.0) <= 5.0 + 1e-6
    assert sigma > calibrate_shard_gaussian([], 5.0, 1e-5, shards=20, steps=400)


def test_published_setting_reference_values():
    # N_d 1,000, T 20,000 (GS-WGAN's eps = 1 run) at sigma_eff 0.8831 is really ~45.1; eps 1 needs ~20.
    assert shard_gaussian_epsilon(PUBLISHED_DELTA, 0.8831, 1000, 20000) == pytest.approx(45.1, abs=0.1)
    assert epsilon_upper([ShardGaussianEvent("f", 0.8831, 1000, 20000)], PUBLISHED_DELTA) == pytest.approx(45.1, abs=0.1)
    at_20 = epsilon_upper([ShardGaussianEvent("f", 20.0, 1000, 20000)], PUBLISHED_DELTA)
    assert 0.98 < at_20 < 1.03 and epsilon_upper([ShardGaussianEvent("f", 19.6, 1000, 20000)], PUBLISHED_DELTA) > 1.0


def test_rdp_cross_check_bounds_the_prv_from_above():
    events = [ShardGaussianEvent("f", 2.85, 10, 300)]
    prv, rdp = epsilon_upper(events, SMALL_DELTA), rdp_epsilon(events, SMALL_DELTA)
    assert prv - 0.02 <= rdp < 1.3 * prv


def test_event_record_fields_and_bad_input():
    event = ShardGaussianEvent("finetune", 2.5, 10, 300, note="x")
    record = event.to_dict()
    assert {k: record[k] for k in ("mechanism", "noise_multiplier", "shards", "steps")} == {
        "mechanism": "shard_gaussian", "noise_multiplier": 2.5, "shards": 10, "steps": 300}
    assert event_from_dict(record) == event
    for bad in ({"shards": 0}, {"shards": 2.5}, {"steps": 0}, {"noise_multiplier": -1.0}):
        with pytest.raises(BadInput) as info:
            event_from_dict({**record, **bad})
        assert "\n" not in str(info.value) and next(iter(bad)) in str(info.value)
