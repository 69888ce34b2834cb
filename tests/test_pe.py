"""PE (Private Evolution): the histogram's sensitivity on neighbouring datasets, the T events
against prv-accountant and the mu-GDP closed form, thresholding and resampling on scripted
counts, the generation-API interface through a stub (tests only), resume after a crash, and
all five stages through the CLI with the default (EDM) API."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
import yaml
from prv_accountant import GaussianMechanism, PRVAccountant
from scipy.optimize import brentq
from scipy.stats import norm

import pe_stub_api
from dpsynth.cli.main import main
from dpsynth.errors import BadInput
from dpsynth.evaluation.fidelity import FeatureNetwork
from dpsynth.mechanisms.pe_histogram import add_noise, nearest_neighbour_votes, resample, threshold
from dpsynth.methods import get_method
from dpsynth.methods.pe.population import Population, PopulationConfig
from dpsynth.models.edm import EDMConfig, EDMDiffusion
from dpsynth.training.options import FinetuneOptions, resolve_options

DATA = ["--sensitive", "fashionmnist", "--limit", "200", "--public-size", "60000", "--resolution", "8"]
TINY_EDM = "width=8,ch_mult=1:1,num_res_blocks=1"


# ---- the mechanism ------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3])
def test_removing_one_image_moves_the_counts_by_k_ones(k):
    gen = torch.Generator().manual_seed(k)
    private, private_labels = torch.randn(40, 5, generator=gen), torch.randint(0, 3, (40,), generator=gen)
    candidates, blocks = torch.randn(30, 5, generator=gen), torch.arange(3).repeat_interleave(10)
    full = nearest_neighbour_votes(private, private_labels, candidates, blocks, k, 3)
    for removed in range(len(private)):
        keep = torch.arange(len(private)) != removed
        neighbour = nearest_neighbour_votes(private[keep], private_labels[keep], candidates, blocks, k, 3)
        diff = full - neighbour
        assert sorted(diff.tolist()) == [0.0] * (30 - k) + [1.0] * k  # k distinct candidates, +1 each
        assert math.isclose(float(diff.norm()), math.sqrt(k))
        voted = torch.nonzero(diff).flatten()
        assert (blocks[voted] == private_labels[removed]).all()  # only in its own class's block
    for c in range(3):  # each image casts exactly k votes, inside its class
        assert full[blocks == c].sum() == k * (private_labels == c).sum()


def test_votes_go_to_the_nearest_candidates():
    private = torch.tensor([[0.0], [10.0], [10.2]])
    candidates = torch.tensor([[0.1], [5.0], [9.9], [100.0]])
    counts = nearest_neighbour_votes(private, torch.zeros(3, dtype=torch.long), candidates,
                                     torch.zeros(4, dtype=torch.long), 1, 1)
    assert counts.tolist() == [1.0, 0.0, 2.0, 0.0]


def test_noise_has_std_sigma_sqrt_k_and_is_secret_by_default():
    counts = torch.zeros(200_000, dtype=torch.float64)
    noisy = add_noise(counts, 1.5, 4, torch.Generator().manual_seed(0))
    assert abs(float(noisy.std()) - 3.0) < 0.03 and abs(float(noisy.mean())) < 0.03
    assert not torch.equal(add_noise(counts[:10], 1.0, 1), add_noise(counts[:10], 1.0, 1))  # OS entropy


def test_threshold_and_resampling_on_scripted_counts():
    noisy = torch.tensor([5.0, 2.0, 0.5, -1.0, 1.0, 9.0, 9.0, 1.0, 1.5, -2.0, 0.3, 1.0], dtype=torch.float64)
    weights = threshold(noisy, 2.0)
    assert weights.tolist() == [3.0, 0.0, 0.0, 0.0, 0.0, 7.0, 7.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    blocks = torch.arange(3).repeat_interleave(4)
    parents, fallbacks = resample(weights, noisy, blocks, 4000, 3, torch.Generator().manual_seed(1))
    assert len(parents) == 12000 and (blocks[parents] == torch.arange(3).repeat_interleave(4000)).all()
    assert set(parents[:4000].tolist()) == {0}  # the only count above H
    share = (parents[4000:8000] == 5).float().mean()
    assert set(parents[4000:8000].tolist()) == {5, 6} and abs(float(share) - 0.5) < 0.03  # prop. to 7 : 7
    # Class 2: every thresholded count is 0 -> its noisy counts clipped at 0 (1.5, 0, 0.3, 1.0).
    assert fallbacks == [2]
    drawn = np.bincount(parents[8000:].numpy() - 8, minlength=4) / 4000
    assert np.allclose(drawn, np.array([1.5, 0, 0.3, 1.0]) / 2.8, atol=0.03)
    uniform, fell = resample(torch.zeros(4, dtype=torch.float64), -torch.ones(4, dtype=torch.float64),
                             torch.zeros(4, dtype=torch.long), 4000, 1, torch.Generator().manual_seed(2))
    assert fell == [0] and np.allclose(np.bincount(uniform.numpy(), minlength=4) / 4000, 0.25, atol=0.03)


# ---- accounting -----------------------------------------------------------------------------------
def _gdp_epsilon(sigma: float, t: int, delta: float) -> float:
    """T Gaussian releases of noise multiplier sigma are mu-GDP with mu = sqrt(T)/sigma (exact)."""
    mu = math.sqrt(t) / sigma
    return brentq(lambda e: norm.cdf(-e / mu + mu / 2) - math.exp(e) * norm.cdf(-e / mu - mu / 2) - delta, 0, 200)


@pytest.mark.parametrize("eps, degrees", [(1.0, None), (10.0, None), (4.0, [80.0, 5.0, 2.0])])
def test_t_iterations_are_t_gaussian_events_within_eps(eps, degrees):
    method = get_method("pe")
    given = {} if degrees is None else {"variation_degrees": degrees}
    opts = resolve_options(method, FinetuneOptions(train_opts=given))
    t = len(opts.train_opts["variation_degrees"])
    delta = 1.0 / (55_000 * math.log(55_000))
    plan = method.plan_private(dataset_size=55_000, opts=opts, spent=[], eps=eps, delta=delta)
    assert len(plan.events) == t == plan.settings["iterations"] == method.private_steps(plan)
    sigma = plan.settings["noise_multiplier"]
    assert all(e.mechanism == "gaussian" and e.noise_multiplier == sigma and e.steps == 1 for e in plan.events)
    _, estimate, upper = PRVAccountant(prvs=[GaussianMechanism(sigma)], max_self_compositions=[t], eps_error=0.01,
                                       delta_error=delta / 1000).compute_epsilon(delta, [t])
    exact = _gdp_epsilon(sigma, t, delta)
    assert estimate <= eps and exact <= eps
    assert exact > 0.98 * eps  # the calibration is tight, not merely safe
    if degrees is None and eps == 10.0:  # DPImageBench's F-MNIST eps=10 sigma (T = 11 at its delta)
        assert abs(sigma - 1.77) < 0.02


def test_bad_train_opts_are_refused_before_planning():
    method = get_method("pe")
    for bad, message in [({"nn_k": 0}, "nn_k=0"), ({"variation_degrees": []}, "variation_degrees"),
                         ({"threshold": -1}, "threshold=-1"), ({"api": "no_such_module:f"}, "cannot be imported"),
                         ({"api": "nocolon"}, "MODULE:FACTORY"), ({"nn_k": 9, "population_per_class": 4}, "exceeds")]:
        opts = resolve_options(method, FinetuneOptions(train_opts=bad))
        with pytest.raises(BadInput, match=message):
            method.plan_private(dataset_size=100, opts=opts, spent=[], eps=1.0, delta=1e-5)


# ---- the API interface (stub) -------------------------------------------------------------------
def _pixel_value_features() -> FeatureNetwork:
    return FeatureNetwork(name="test:mean-pixel", extractor=lambda batch: batch.mean(dim=(1, 2, 3))[:, None])


def test_selection_and_variation_move_the_population_to_each_private_class():
    """Flat private images of value 40 / 120 / 200 by class; the stub API starts from uniform
    values and varies them; with little noise PE's votes pull each block to its class."""
    values = torch.tensor([40.0, 120.0, 200.0])
    labels = torch.arange(3).repeat_interleave(30)
    images = values[labels].to(torch.uint8)[:, None, None, None].expand(-1, 1, 4, 4).clone()
    method = get_method("pe")
    method.feature_network = _pixel_value_features()
    opts = resolve_options(method, FinetuneOptions(train_opts={
        "api": "pe_stub_api:make_api", "variation_degrees": [30, 20, 10, 5, 5, 3], "population_per_class": 20,
        "threshold": 0.0, "lookahead": 2}))
    plan = method.plan_private(dataset_size=90, opts=opts, spent=[], eps=200.0, delta=1e-5)
    generator = EDMDiffusion(EDMConfig(resolution=4, channels=1, num_classes=3, width=4, ch_mult=(1,)))
    trained = method.train_private(generator, images, labels, opts=opts, plan=plan, device=torch.device("cpu"),
                                   progress=lambda *a, **k: None, checkpoints=None)
    population = trained.generator
    assert isinstance(population, Population) and population.images.shape == (60, 1, 4, 4)
    for c in range(3):
        block = population.images[population.labels == c].float()
        assert abs(float(block.mean()) - float(values[c])) < 12, (c, float(block.mean()))
    # The population is what `generate` samples: rebuilt from its config, classes as asked, no repeats.
    rebuilt = method.generator_from_config(population.cfg.to_dict())
    rebuilt.load_state_dict(population.state_dict())
    drawn = rebuilt.sample(torch.arange(3).repeat(20), torch.Generator().manual_seed(0))
    assert torch.equal(drawn.sort(0).values, population.images.sort(0).values)


# ---- the CLI ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """One tiny run with the default API pretrained on a public set (scikit-learn's 8x8 digits: a
    few steps), copied per test."""
    run = tmp_path_factory.mktemp("pe") / "base"
    assert main(["select-public", "--run", str(run), "--method", "pe", *DATA, "--quiet"]) == 0
    assert main(["pretrain", "--run", str(run), "--method", "pe", *DATA, "--public", "digits", "--epochs", "1",
                 "--batch-size", "256", "--arch", TINY_EDM, "--quiet"]) == 0
    return run


def _manifest(run):
    return yaml.safe_load((run / "manifest.yaml").read_text())


def test_all_five_stages_through_the_cli_with_the_default_api(pretrained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pretrained, run)
    opts = "variation_degrees=80:3,population_per_class=6,lookahead=1,sample_steps=2,threshold=1"
    assert main(["finetune", "--run", str(run), "--eps", "3", "--train-opts", opts, "--quiet"]) == 0
    assert main(["generate", "--run", str(run), "--n", "120", "--quiet"]) == 0
    assert main(["evaluate", "--run", str(run), "--classifier", "cnn", "--epochs", "1", "--quiet"]) == 0
    m = _manifest(run)
    events, delta = m["privacy"]["events"], m["privacy"]["delta"]
    assert [(e["stage"], e["mechanism"]) for e in events] == [("finetune", "gaussian")] * 2
    sigma = events[0]["noise_multiplier"]
    _, estimate, upper = PRVAccountant(prvs=[GaussianMechanism(sigma)], max_self_compositions=[2], eps_error=0.01,
                                       delta_error=delta / 1000).compute_epsilon(delta, [2])
    assert estimate <= m["privacy"]["epsilon"] <= upper + 1e-9 and m["privacy"]["epsilon"] <= 3.0
    assert _gdp_epsilon(sigma, 2, delta) <= m["privacy"]["epsilon"]
    config = m["stages"]["finetune"]["config"]
    assert config["feature_network"].startswith("querynet(digits,8px,1ch):sha256:")
    data = np.load(run / "synthetic.npz")
    assert data["images"].shape == (120, 1, 8, 8) and np.bincount(data["labels"]).tolist() == [12] * 10
    assert all(m["stages"][s]["status"] == "completed" for s in ("pretrain", "finetune", "generate", "evaluate"))


def test_a_crash_mid_way_over_counts_and_resume_continues_under_the_same_events(pretrained, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(pretrained, run)
    opts = "api=pe_stub_api:make_api,variation_degrees=40:20:10,population_per_class=4,lookahead=0"
    monkeypatch.setattr(pe_stub_api, "FAIL_AT", 2)  # the 2nd variation: inside iteration 2 of 3
    monkeypatch.setitem(pe_stub_api.CALLS, "variation", 0)
    monkeypatch.setitem(pe_stub_api.CALLS, "random", 0)
    args = ["finetune", "--run", str(run), "--eps", "5", "--train-opts", opts, "--quiet"]
    with pytest.raises(RuntimeError, match="stub API failed"):
        main([*args, "--checkpoint-every", "1"])
    m = _manifest(run)
    assert len(m["privacy"]["events"]) == 3  # all T written before the first histogram; one ran
    assert m["stages"]["finetune"]["status"] == "failed" and m["stages"]["finetune"]["checkpoint"]["step"] == 1
    epsilon = m["privacy"]["epsilon"]
    monkeypatch.setattr(pe_stub_api, "FAIL_AT", 0)
    assert main([*args, "--resume"]) == 0
    m = _manifest(run)
    assert len(m["privacy"]["events"]) == 3 and m["privacy"]["epsilon"] == epsilon  # no new event
    assert pe_stub_api.CALLS["random"] == 1  # the resumed run started from the checkpointed population
    assert m["stages"]["finetune"]["status"] == "completed"
    assert not list(run.glob("checkpoint-*.pt"))  # secrets (RNG states) gone with the stage
