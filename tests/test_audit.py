"""The empirical privacy audit: its bound against reference values and a closed form, its
validity on a mechanism whose epsilon is exact, the noise-scale test's false-alarm rate and
power, and that it passes a correct DP-SGD run and fails broken ones (noise off, and half the
noise, which the bound alone misses) — the audit can fail."""

import json
import math

import numpy as np
import pytest

from dpsynth.audit.bound import one_run_epsilon_lower_bound, one_run_p_value
from dpsynth.audit.noise import NOISE_TEST_ALPHA, noise_ratio_interval, noise_ratio_power, noise_scale_test
from dpsynth.audit.one_run import AuditConfig, run_audit
from dpsynth.cli.main import main
from dpsynth.errors import BadInput

# privacy-audit.md, section 2: (m, r, v, delta) -> eps_lb at 95%, +-0.01.
REFERENCE = [((1000, 100, 100, 1e-5), 3.465), ((1000, 100, 95, 1e-5), 2.165), ((1000, 200, 180, 1e-5), 1.796),
             ((1000, 1000, 1000, 1e-5), 5.782), ((1000, 1000, 1000, 0), 5.809), ((1000, 50, 50, 0), 2.785)]


@pytest.mark.parametrize("args,expected", REFERENCE)
def test_bound_matches_the_research_reference_values(args, expected):
    assert one_run_epsilon_lower_bound(*args, alpha=0.05) == pytest.approx(expected, abs=0.01)


@pytest.mark.parametrize("r", [20, 137, 1000])
def test_all_correct_pure_dp_bound_has_a_closed_form(r):
    # delta=0, v=r: p = q^r, so the bound solves q = alpha^(1/r), eps = logit(q).
    q = 0.05 ** (1 / r)
    assert one_run_epsilon_lower_bound(1000, r, r, 0.0) == pytest.approx(math.log(q / (1 - q)), abs=1e-3)


def test_p_value_grows_with_epsilon_and_delta():
    eps = np.linspace(0, 6, 13)
    p = [one_run_p_value(e, 1e-5, 1000, 200, 150) for e in eps]
    assert all(a <= b + 1e-15 for a, b in zip(p, p[1:])) and p[0] < 1e-3 and p[-1] > 0.5
    assert one_run_p_value(1.0, 1e-3, 1000, 200, 150) > one_run_p_value(1.0, 0.0, 1000, 200, 150)
    with pytest.raises(BadInput):
        one_run_p_value(1.0, 0.0, 10, 20, 5)


def test_bound_is_valid_on_exact_randomized_response():
    # eps-randomized response is exactly eps-DP per canary: the bound may exceed eps in at
    # most alpha of the trials (plus Monte Carlo error).
    rng = np.random.default_rng(1)
    eps, m, trials = 2.0, 1000, 200
    q = math.exp(eps) / (1 + math.exp(eps))
    violations = 0
    for _ in range(trials):
        correct = int((rng.random(m) < q).sum())
        violations += one_run_epsilon_lower_bound(m, m, correct, 0.0) > eps
    assert violations / trials <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / trials)


@pytest.mark.parametrize("n", [10, 200, 2000])
def test_noise_interval_is_the_chi2_acceptance_region(n):
    lo, hi = noise_ratio_interval(n, 0.01)
    assert lo < 1 < hi
    # Independent of scipy: Wilson-Hilferty, chi^2_k's p-quantile ~ k (1 - 2/(9k) + z_p sqrt(2/(9k)))^3,
    # so the ratio's ends are sqrt(quantile / k), k = n - 1 degrees of freedom.
    k, z = n - 1, 2.5758293035489  # z_{0.995}
    wilson = [math.sqrt((1 - 2 / (9 * k) + sign * z * math.sqrt(2 / (9 * k))) ** 3) for sign in (-1, 1)]
    assert (lo, hi) == pytest.approx(wilson, rel=0.02 if n < 50 else 1e-3)  # its error shrinks with k
    assert noise_ratio_power(1.0, n, 0.01) == pytest.approx(0.01, rel=1e-6)  # the false-alarm rate
    assert noise_ratio_power(0.5 * (1 + lo), n, 0.01) > noise_ratio_power(1.0, n, 0.01)
    with pytest.raises(BadInput, match="n >= 2"):
        noise_ratio_interval(1)


def test_noise_test_false_alarm_rate_and_power_by_monte_carlo():
    rng = np.random.default_rng(0)
    n, alpha, trials, s = 200, 0.02, 4000, 3.7
    scores = rng.normal(5.0, s, size=(trials, n))  # a common offset does not matter: ddof=1 std
    low = sum(noise_scale_test(x, s, alpha).ratio < noise_ratio_interval(n, alpha)[0] for x in scores)
    high = sum(not noise_scale_test(x, s, alpha).passed for x in scores) - low
    se = math.sqrt(alpha / 2 * (1 - alpha / 2) / trials)
    assert abs(low / trials - alpha / 2) <= 4 * se and abs(high / trials - alpha / 2) <= 4 * se, (low, high)
    # sigma/2: the ratio is ~0.5, far below the interval for the OUT-canary counts the audit uses.
    assert all(not noise_scale_test(x, 2 * s).passed for x in scores[:200])
    assert noise_ratio_power(0.5, 150, NOISE_TEST_ALPHA) > 1 - 1e-12
    too_small = noise_scale_test(scores[0], 2 * s)
    assert too_small.reason().startswith("noise too small") and "200 OUT canaries" in too_small.reason()
    assert noise_scale_test(scores[0], s / 2).reason().startswith("noise too large")


SMALL = dict(canaries=400, epochs=12, claimed_epsilon=2.0, seed=3)
SMALL_ARGS = ["audit", "--eps", str(SMALL["claimed_epsilon"]), "--canaries", str(SMALL["canaries"]),
              "--epochs", str(SMALL["epochs"]), "--seed", str(SMALL["seed"]), "--json", "--quiet"]


def test_audit_passes_the_real_mechanism_and_its_noise_has_the_accounted_scale():
    result = run_audit(AuditConfig(**SMALL))
    assert result.passed and result.bound_passed and result.noise_passed and result.reason == ""
    assert result.epsilon_lower_bound <= result.claimed_epsilon <= 2.0
    # OUT canaries' scores are pure DP noise: their spread must be what sigma predicts.
    lo, hi = result.noise_ratio_interval
    assert lo <= result.noise_std_ratio <= hi and 0.8 < lo < 0.9 < 1.1 < hi < 1.2, result
    assert result.out_canaries == SMALL["canaries"] - len(result.included)
    assert result.noise_alpha == NOISE_TEST_ALPHA and result.noise_scale == 1.0


def test_cli_passes_the_correct_run_and_fails_half_the_noise_which_the_bound_misses(capsys):
    assert main(SMALL_ARGS) == 0, capsys.readouterr().err
    correct = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert correct["passed"] and correct["bound_passed"] and correct["noise_passed"]

    code = main(SMALL_ARGS + ["--noise-scale", "0.5"])
    captured = capsys.readouterr()
    assert code == 1, captured.err
    halved = json.loads(captured.out.strip().splitlines()[-1])
    # The same claim (sigma calibrated for it), half the noise: the bound stays below the claim...
    assert halved["claimed_epsilon"] == correct["claimed_epsilon"] and halved["bound_passed"]
    # ...and the noise-scale test sees the std halved.
    assert halved["noise_std_ratio"] == pytest.approx(0.5 * correct["noise_std_ratio"], rel=0.02)
    assert not halved["noise_passed"] and not halved["passed"]
    assert halved["noise_std_ratio"] < halved["noise_ratio_interval"][0]
    assert captured.err.count("\n") == 1 and captured.err.startswith("audit FAILED: noise too small"), captured.err
    assert "noise scaled by 0.5 on purpose" in captured.err and "lower bound" not in captured.err


@pytest.mark.parametrize("flag,value", [("--noise-scale", "0"), ("--noise-scale", "nan"), ("--noise-alpha", "1")])
def test_bad_noise_flags_are_one_line_exit_2(capsys, flag, value):
    assert main(SMALL_ARGS + [flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and flag in err and "Traceback" not in err


def test_audit_fails_the_broken_mechanism_with_noise_off(capsys, tmp_path):
    out = tmp_path / "audit.json"
    code = main(SMALL_ARGS + ["--no-noise", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 1, captured.err
    shown = json.loads(captured.out.strip().splitlines()[-1])
    assert shown["epsilon_lower_bound"] > shown["claimed_epsilon"] and not shown["passed"]
    assert not shown["bound_passed"] and not shown["noise_passed"] and shown["noise_std_ratio"] == 0
    assert captured.err.startswith("audit FAILED: lower bound") and captured.err.count("\n") == 1
    assert "noise too small" in captured.err and "noise was off on purpose" in captured.err
    saved = json.loads(out.read_text())
    assert saved["epsilon_lower_bound"] == shown["epsilon_lower_bound"]
    assert saved["included"] == sorted(set(saved["included"])) and 0 <= min(saved["included"])
    assert max(saved["included"]) < SMALL["canaries"] and 150 < len(saved["included"]) < 250  # Bernoulli(1/2)
    # Every IN canary must be sampled at least once for the broken run to show all of them.
    assert shown["sample_rate"] * shown["steps"] >= 10
