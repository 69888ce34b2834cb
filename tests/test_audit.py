"""The empirical privacy audit: its bound against reference values and a closed form, its
validity on a mechanism whose epsilon is exact, and that it passes a correct DP-SGD run and
fails a broken one (noise off) — the audit can fail."""

import json
import math

import numpy as np
import pytest

from dpsynth.audit.bound import one_run_epsilon_lower_bound, one_run_p_value
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


SMALL = dict(canaries=400, epochs=12, claimed_epsilon=2.0, seed=3)


def test_audit_passes_the_real_mechanism_and_its_noise_has_the_accounted_scale():
    result = run_audit(AuditConfig(**SMALL))
    assert result.passed and result.epsilon_lower_bound <= result.claimed_epsilon <= 2.0
    # OUT canaries' scores are pure DP noise: their spread must be what sigma predicts.
    assert 0.85 <= result.noise_std_ratio <= 1.15, result.noise_std_ratio


def test_audit_fails_the_broken_mechanism_with_noise_off(capsys, tmp_path):
    out = tmp_path / "audit.json"
    code = main(["audit", "--eps", str(SMALL["claimed_epsilon"]), "--canaries", str(SMALL["canaries"]),
                 "--epochs", str(SMALL["epochs"]), "--seed", str(SMALL["seed"]), "--no-noise", "--json", "--quiet",
                 "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 1, captured.err
    shown = json.loads(captured.out.strip().splitlines()[-1])
    assert shown["epsilon_lower_bound"] > shown["claimed_epsilon"] and not shown["passed"]
    assert "audit FAILED" in captured.err and captured.err.count("\n") == 1
    saved = json.loads(out.read_text())
    assert saved["epsilon_lower_bound"] == shown["epsilon_lower_bound"]
    assert saved["included"] == sorted(set(saved["included"])) and 0 <= min(saved["included"])
    assert max(saved["included"]) < SMALL["canaries"] and 150 < len(saved["included"]) < 250  # Bernoulli(1/2)
    # Every IN canary must be sampled at least once for the broken run to show all of them.
    assert shown["sample_rate"] * shown["steps"] >= 10
