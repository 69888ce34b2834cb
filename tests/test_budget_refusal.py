"""The budget refusal leads to a run that works: its numbers are checked against prv-accountant's
own mechanisms (not our accountant), and following each option really plans (issue 13)."""

import contextlib
import io
import re

import pytest
import yaml
from prv_accountant import GaussianMechanism, PoissonSubsampledGaussianMechanism, PRVAccountant

from cli_helpers import snapshot
from dpsynth.cli.main import main
from dpsynth.errors import BudgetExhausted
from dpsynth.methods import get_method
from dpsynth.methods.diffusion import DPFETA
from dpsynth.pipeline.rundir import RunDir
from dpsynth.privacy.events import GaussianEvent
from dpsynth.privacy.plans import calibrate_private_optimizer
from dpsynth.privacy.refusal import round_down, round_up
from dpsynth.training.options import FinetuneOptions, resolve_options

SELECT = ["select-public", "--sensitive", "fashionmnist", "--public", "mnist5k", "--limit", "2000",
          "--public-size", "60000", "--quiet"]  # declared N = 2000 exactly
FINETUNE = ["--epochs", "1", "--batch-size", "250"]  # N = 2000: q = 1/8, 8 steps
Q, STEPS = 1 / 8, 8
WARMUP = {"epochs": 1, "batch_size": 50, "augment": False}  # the warm-up's schedule (post-processing)
NUMBER = r"(\d+(?:\.\d+)?(?:e-?\d+)?)"


def prv_upper(mechanisms, delta):
    """(mechanism, compositions) pairs composed by prv-accountant directly."""
    prvs, counts = zip(*mechanisms)
    return PRVAccountant(prvs=list(prvs), max_self_compositions=list(counts), eps_error=0.01,
                         delta_error=delta / 1000).compute_epsilon(delta=delta, num_self_compositions=list(counts))[2]


def plan(spent, eps, delta):
    """What `finetune --eps EPS --epochs 1 --batch-size 250` plans (the stage's own planning call)."""
    method = get_method("privimage-cvae")
    opts = resolve_options(method, FinetuneOptions(epochs=1, batch_size=250))
    return method.plan_private(dataset_size=2000, opts=opts, spent=list(spent), eps=eps, delta=delta)


@pytest.fixture(scope="module")
def refused(tmp_path_factory):
    """The issue's steps: select-public --sigma 1.2, then finetune --eps 1. Returns the run, what
    finetune printed on stderr, and whether the run directory was left as it was."""
    run = tmp_path_factory.mktemp("refusal") / "run"
    assert main([*SELECT, "--sigma", "1.2", "--run", str(run)]) == 0
    before, stderr = snapshot(run), io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(["finetune", "--eps", "1", *FINETUNE, "--run", str(run), "--quiet"])  # no heartbeat lines
    assert code == 2
    return run, stderr.getvalue(), snapshot(run) == before


def test_the_refusal_states_delta_the_spending_event_and_numbers_that_fit(refused):
    run, err, unchanged = refused
    first, *options = err.splitlines()
    assert unchanged  # refused before anything is written

    delta = yaml.safe_load((run / "manifest.yaml").read_text())["privacy"]["delta"]
    spent = prv_upper([(GaussianMechanism(1.2), 1)], delta)
    assert first == (f"error: finetune cannot run within the target --eps 1 (δ={delta:.3g}): the run has already "
                     f"spent ε={spent:.3f} on select-public's gaussian σ=1.2")
    assert len(options) == 2 and all(line.startswith("  - ") for line in options)

    # (a) this run: pretrain (it has not run), then the least --eps that fits the 8 steps at the most noise.
    here = re.fullmatch(rf"  - in this run: pretrain, then finetune --eps {NUMBER} or more \(the least that fits "
                        rf"its {STEPS} steps at sample rate 0.125, at noise σ=200, the most calibration tries\); "
                        rf"--eps {NUMBER} gives them noise σ≈{NUMBER}, about what --eps 1 gives them when nothing "
                        rf"else is spent", options[0])
    assert here, options[0]
    least, usable, sigma_alone = (float(x) for x in here.groups())
    exact = prv_upper([(GaussianMechanism(1.2), 1), (PoissonSubsampledGaussianMechanism(Q, 200.0), STEPS)], delta)
    assert exact <= least < exact + 0.01  # rounded up, by less than its third digit
    (event,) = plan([GaussianEvent("select-public", 1.2)], least, delta).events  # --eps least: finetune plans
    assert prv_upper([(GaussianMechanism(1.2), 1),
                      (PoissonSubsampledGaussianMechanism(Q, event.noise_multiplier), STEPS)], delta) <= least
    # The usable figure: sigma_alone is about the noise eps = 1 buys the steps alone, and --eps usable gets it.
    assert prv_upper([(PoissonSubsampledGaussianMechanism(Q, sigma_alone), STEPS)], delta) <= 1.0
    assert prv_upper([(PoissonSubsampledGaussianMechanism(Q, sigma_alone * 0.95), STEPS)], delta) > 1.0
    (event,) = plan([GaussianEvent("select-public", 1.2)], usable, delta).events
    assert event.noise_multiplier <= sigma_alone * 1.005


def suggested_query(options: list[str]) -> tuple[float, float]:
    keep = re.fullmatch(rf"  - keep --eps 1: in a new --run directory with the same dataset flags, run select-public "
                        rf"--eps-query {NUMBER} \(or --sigma {NUMBER}\) instead of --sigma 1.2, then pretrain, "
                        rf"then finetune --eps 1", options[1])
    assert keep, options[1]
    return float(keep.group(1)), float(keep.group(2))


def test_a_new_run_with_the_suggested_sigma_fits_eps_1(refused):
    run, err, _ = refused
    delta = RunDir.open(run).delta
    eps_query, sigma = suggested_query(err.splitlines()[1:])
    assert eps_query <= 0.1  # most of the budget is left to fine-tuning
    assert prv_upper([(GaussianMechanism(sigma), 1)], delta) <= eps_query  # sigma's query is worth eps_query
    (event,) = plan([GaussianEvent("select-public", sigma)], 1.0, delta).events  # finetune --eps 1 plans there
    assert prv_upper([(GaussianMechanism(sigma), 1),
                      (PoissonSubsampledGaussianMechanism(Q, event.noise_multiplier), STEPS)], delta) <= 1.0


def test_a_new_run_with_the_suggested_eps_query_fits_eps_1(refused, tmp_path):
    run, err, _ = refused
    eps_query, _ = suggested_query(err.splitlines()[1:])
    fresh = tmp_path / "new"
    assert main([*SELECT, "--eps-query", f"{eps_query:g}", "--run", str(fresh)]) == 0  # the real stage
    new = RunDir.open(fresh)
    (query,) = new.events()
    assert new.delta == RunDir.open(run).delta  # same dataset flags, same delta
    assert prv_upper([(GaussianMechanism(query.noise_multiplier), 1)], new.delta) <= eps_query
    (event,) = plan(new.events(), 1.0, new.delta).events  # what `finetune --eps 1` plans in the new run
    assert prv_upper([(GaussianMechanism(query.noise_multiplier), 1),
                      (PoissonSubsampledGaussianMechanism(Q, event.noise_multiplier), STEPS)], new.delta) <= 1.0


def test_a_plan_too_large_for_any_noise_names_the_least_eps_and_how_to_shrink():
    delta, q, steps = 1e-5, 0.01, 100
    with pytest.raises(BudgetExhausted) as caught:
        calibrate_private_optimizer("dpsgd", [], 0.005, delta, sample_rate=q, steps=steps)
    first, *options = str(caught.value).splitlines()
    assert first.startswith("finetune cannot run within the target eps=0.005 (δ=1e-05): its 100 steps at sample "
                            "rate 0.01 would bring it to ε=")
    least = float(re.search(rf"`eps` {NUMBER} or more", options[0]).group(1))
    exact = prv_upper([(PoissonSubsampledGaussianMechanism(q, 200.0), steps)], delta)
    assert exact <= least < exact * 1.01
    assert calibrate_private_optimizer("dpsgd", [], least, delta, sample_rate=q, steps=steps) <= 200.0  # it plans
    assert any("fewer `epochs`" in line for line in options)


def test_dp_feta_central_images_over_the_target_name_a_central_sigma_that_fits():
    delta, target = 1e-5, 2.0
    spent = [GaussianEvent("select-public", 5.0)]
    with pytest.raises(BudgetExhausted) as caught:
        DPFETA().plan_warmup(dataset_size=6000, sigma=1.0, queries=5, batch=6000, spent=spent, delta=delta,
                             target=target, **WARMUP)
    first, *options = str(caught.value).splitlines()
    assert first.startswith("pretrain cannot run within the run's target ε=2 (δ=1e-05): the run has already spent "
                            "ε=") and "select-public's gaussian σ=5, and central images (central_sigma=1)" in first
    sigma = float(re.search(rf"`central_sigma` {NUMBER} or more", options[0]).group(1))
    assert prv_upper([(GaussianMechanism(5.0), 1), (GaussianMechanism(sigma), 5)], delta) <= target  # q = 1
    DPFETA().plan_warmup(dataset_size=6000, sigma=sigma, queries=5, batch=6000, spent=spent, delta=delta,
                         target=target, **WARMUP)


@pytest.mark.parametrize("x", [3.1705, 0.012345, 12.0, 199.99, 1e-4])
def test_rounding_keeps_the_side_that_fits(x):
    assert x <= round_up(x) <= x * 1.01 + 1e-12
    assert x * 0.9 <= round_down(x) <= x
