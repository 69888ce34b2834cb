"""Accounting checked against independent references, never against our own numbers."""

import math

import pytest
from prv_accountant import GaussianMechanism, LaplaceMechanism, PoissonSubsampledGaussianMechanism, PRVAccountant
from scipy.optimize import brentq
from scipy.stats import norm

from dpsynth.errors import BadInput, BudgetExhausted
from dpsynth.privacy.accountant import compose_epsilon, default_delta, epsilon_upper, rdp_epsilon
from dpsynth.privacy.calibration import calibrate_sigma
from dpsynth.privacy.events import GaussianEvent, LaplaceEvent, PoissonGaussianEvent, event_from_dict


def analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """Balle & Wang (2018), Thm. 8: exact delta(eps) of the Gaussian mechanism, solved for eps."""
    def delta_of(eps):
        return norm.cdf(-eps * sigma + 1 / (2 * sigma)) - math.exp(eps) * norm.cdf(-eps * sigma - 1 / (2 * sigma))
    return brentq(lambda e: delta_of(e) - delta, 0.0, 100.0)


@pytest.mark.parametrize("sigma,delta", [(1.0, 1e-5), (2.5, 1e-6), (0.8, 1e-3)])
def test_single_gaussian_matches_closed_form(sigma, delta):
    exact = analytic_gaussian_epsilon(sigma, delta)
    bounds = compose_epsilon([GaussianEvent("q", sigma)], delta)
    assert bounds.accountant == "prv"
    assert bounds.upper >= exact - 1e-9           # an upper bound never under-counts
    assert bounds.upper - exact < 0.03            # and it is tight
    assert bounds.lower <= exact + 1e-9


def test_heterogeneous_composition_matches_prv_accountant_directly():
    delta = 1e-6
    events = [GaussianEvent("select-public", 4.0), PoissonGaussianEvent("finetune", 0.9, 0.01, 700),
              LaplaceEvent("eval", 0.2)]
    reference = PRVAccountant(
        prvs=[GaussianMechanism(4.0), PoissonSubsampledGaussianMechanism(0.01, 0.9), LaplaceMechanism(0.2)],
        max_self_compositions=[1, 700, 1], eps_error=0.01, delta_error=delta / 1000,
    ).compute_epsilon(delta=delta, num_self_compositions=[1, 700, 1])
    ours = compose_epsilon(events, delta)
    assert ours.upper == pytest.approx(reference[2], abs=1e-9)
    assert ours.estimate == pytest.approx(reference[1], abs=1e-9)


@pytest.mark.parametrize("make", [
    lambda n: PoissonGaussianEvent("f", 1.1, 0.02, n),
    lambda n: GaussianEvent("g", 3.0, steps=n),
    lambda n: LaplaceEvent("l", 0.3, steps=n),
])
def test_compose_n_equals_n_separate_events(make):
    delta = 1e-5
    one_event_n_steps = epsilon_upper([make(6)], delta)
    six_events = epsilon_upper([make(1)] * 6, delta)
    assert one_event_n_steps == pytest.approx(six_events, abs=1e-9)
    assert one_event_n_steps > epsilon_upper([make(1)], delta)


def test_rdp_cross_check_is_looser_but_close():
    events = [GaussianEvent("q", 5.0), PoissonGaussianEvent("f", 1.0, 0.01, 1000)]
    prv, rdp = epsilon_upper(events, 1e-5), rdp_epsilon(events, 1e-5)
    assert prv <= rdp + 0.01
    assert rdp < 1.5 * prv


def test_calibration_never_exceeds_target_and_is_nearly_tight():
    spent = [GaussianEvent("select-public", 5.0)]
    delta, q, steps = 1e-5, 0.02, 300
    for target in (1.0, 4.0):
        sigma = calibrate_sigma(spent, target, delta, lambda s: [PoissonGaussianEvent("f", s, q, steps)])
        achieved = epsilon_upper([*spent, PoissonGaussianEvent("f", sigma, q, steps)], delta)
        assert achieved <= target
        looser = epsilon_upper([*spent, PoissonGaussianEvent("f", sigma * 0.98, q, steps)], delta)
        assert looser > target * 0.97


def test_calibration_refuses_when_budget_already_spent():
    spent = [GaussianEvent("select-public", 0.5)]
    already = epsilon_upper(spent, 1e-5)
    with pytest.raises(BudgetExhausted, match="already spent"):
        calibrate_sigma(spent, already * 0.9, 1e-5, lambda s: [PoissonGaussianEvent("f", s, 0.01, 10)])


@pytest.mark.parametrize("bad", [
    lambda: GaussianEvent("x", 0.0), lambda: GaussianEvent("x", float("nan")), lambda: GaussianEvent("x", -1.0),
    lambda: PoissonGaussianEvent("x", 1.0, 1.5, 3), lambda: PoissonGaussianEvent("x", 1.0, 0.1, 0),
    lambda: LaplaceEvent("x", 0.0),
])
def test_invalid_events_are_refused(bad):
    with pytest.raises(BadInput):
        bad()


def test_event_records_round_trip_and_unknown_mechanisms_are_refused():
    event = PoissonGaussianEvent("finetune", 1.2, 0.01, 50)
    record = {**event.to_dict(), "time": "t", "epsilon_after": 1.0}
    assert event_from_dict(record) == event
    assert record["mechanism"] == "poisson_gaussian"
    with pytest.raises(BadInput, match="unknown"):
        event_from_dict({"stage": "x", "mechanism": "exponential", "epsilon0": 1})
    with pytest.raises(BadInput, match="unknown fields"):
        event_from_dict({**record, "surprise": 1})


def test_default_delta_is_below_one_over_n():
    n = 60000
    assert default_delta(n) == pytest.approx(1 / (n * math.log(n)))
    assert default_delta(n) < 1 / n


def test_when_prv_discretisation_fails_the_rdp_bound_is_reported_and_labelled():
    from prv_accountant.other_accountants import RDP

    # Very low noise with a large sampling rate: prv-accountant 0.2 cannot discretise this PRV.
    event = PoissonGaussianEvent("finetune", 0.6422, 0.125, 16)
    with pytest.raises(RuntimeError):
        PRVAccountant(prvs=[PoissonSubsampledGaussianMechanism(0.125, 0.6422)], max_self_compositions=[16],
                      eps_error=0.01, delta_error=6.578e-8).compute_epsilon(6.578e-5, [16])
    bounds = compose_epsilon([event], 6.578e-5)
    assert bounds.accountant == "rdp"
    reference = RDP([PoissonSubsampledGaussianMechanism(0.125, 0.6422)]).compute_epsilon(6.578e-5, [16])[2]
    assert bounds.upper == pytest.approx(reference, rel=0.02)
