"""dp-gmm: the moment releases' sensitivity and noise, its accounting against prv-accountant's own
Gaussian mechanism and the closed form, the mixture's sampling, and all stages through the CLI."""

import math

import numpy as np
import pytest
import torch
import yaml
from prv_accountant import GaussianMechanism, PRVAccountant
from scipy.stats import norm
from typer.testing import CliRunner

from dpsynth.cli.app import app
from dpsynth.cli.main import main
from dpsynth.errors import BadInput, BudgetExhausted
from dpsynth.mechanisms.moment_release import (COUNT, COUNT_ONLY, FIRST, FIRST_ONLY, SECOND, clip_rows,
                                               first_moments, second_moments)
from dpsynth.methods import get_method
from dpsynth.models.gaussian_mixture import GaussianMixture, GaussianMixtureConfig
from dpsynth.privacy.accountant import compose_epsilon
from dpsynth.privacy.events import GaussianEvent
from dpsynth.training.options import FinetuneOptions, resolve_options


def _raw_second(rows, cells, num_cells, bound, sigma, seed):
    """The released vector in the mechanism's own coordinates (where the sensitivity is 1)."""
    torch.manual_seed(seed)
    parts = []
    for cell in second_moments(rows, cells, num_cells, bound=bound, noise_multiplier=sigma):
        parts += [cell.second.flatten() * SECOND / bound ** 2, cell.first * FIRST / bound,
                  torch.tensor([cell.count * COUNT])]
    return torch.cat(parts)


def _raw_first(rows, cells, num_cells, bound, sigma, seed):
    torch.manual_seed(seed)
    out = first_moments(rows, cells, num_cells, bound=bound, noise_multiplier=sigma)
    return torch.cat([out.sums.flatten() * FIRST_ONLY / bound, out.counts * COUNT_ONLY])


@pytest.mark.parametrize("release", [_raw_second, _raw_first])
def test_removing_one_row_moves_the_whole_release_by_at_most_one(release):
    """Same noise draws (same seed) on neighbouring datasets: the difference is exactly the removed
    row's contribution, whose L2 norm must be <= 1, for a row far outside the bound and one on it."""
    gen = torch.Generator().manual_seed(0)
    rows = torch.rand(30, 6, generator=gen, dtype=torch.float64) * 3
    cells = torch.randint(0, 4, (30,), generator=gen)
    bound = 1.5
    rows[0] *= 10                            # clipped to the bound
    rows[1] = rows[1] / rows[1].norm() * bound  # exactly on it: the bound is tight
    full = release(rows, cells, 4, bound, 0.7, seed=5)
    for i in (0, 1, 2):
        keep = torch.arange(30) != i
        moved = (full - release(rows[keep], cells[keep], 4, bound, 0.7, seed=5)).norm()
        assert moved <= 1.0 + 1e-9
    keep = torch.arange(30) != 1
    assert (full - release(rows[keep], cells[keep], 4, bound, 0.7, seed=5)).norm() > 0.99


@pytest.mark.parametrize("release", [_raw_second, _raw_first])
def test_an_empty_set_releases_noise_of_the_stated_std(release):
    sigma = 1.7
    empty_rows, empty_cells = torch.zeros(0, 20, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    raw = torch.cat([release(empty_rows, empty_cells, 3, 2.0, sigma, seed=s) for s in range(8)])
    if release is _raw_second:  # the symmetrised blocks: the diagonal keeps the full variance
        per_cell = 20 * 20 + 20 + 1
        raw = raw.view(-1, per_cell)[:, 20 * 20:]  # first moments and counts: never symmetrised
    assert raw.numel() > 400
    assert float(raw.std()) == pytest.approx(sigma, rel=0.08)
    assert abs(float(raw.mean())) < 4 * sigma / math.sqrt(raw.numel())


@pytest.mark.parametrize("release", [_raw_second, _raw_first])
def test_chunked_float32_rows_release_what_one_float64_pass_does(release, monkeypatch):
    """Rows are clipped and summed in float64 chunks (memory): chunks of 7 over float32 rows give the
    release of one pass over the float64 rows, including a row clipped inside a later chunk."""
    import dpsynth.mechanisms.moment_release as moment_release
    gen = torch.Generator().manual_seed(1)
    rows = torch.rand(40, 5, generator=gen) * 2
    rows[33] *= 20
    cells = torch.randint(0, 3, (40,), generator=gen)
    whole = release(rows.double(), cells, 3, 1.2, 0.5, seed=9)
    monkeypatch.setattr(moment_release, "CHUNK", 7)
    torch.testing.assert_close(release(rows, cells, 3, 1.2, 0.5, seed=9), whole)


def test_clip_rows_scales_down_only_the_rows_outside():
    rows = torch.tensor([[3.0, 4.0], [0.3, 0.4]], dtype=torch.float64)
    clipped = clip_rows(rows, 1.0)
    torch.testing.assert_close(clipped, torch.tensor([[0.6, 0.8], [0.3, 0.4]], dtype=torch.float64))


def _gaussian_delta(mu: float, eps: float) -> float:
    """Closed form of a mu-GDP mechanism (Dong, Roth & Su 2019; Balle & Wang 2018)."""
    return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)


@pytest.mark.parametrize("lloyd,eps", [(3, 10.0), (0, 1.0)])
def test_the_planned_releases_match_prv_and_the_closed_form(lloyd, eps):
    m = get_method("dp-gmm")
    n, delta = 60_000, 1 / (60_000 * math.log(60_000))
    opts = resolve_options(m, FinetuneOptions(train_opts=f"lloyd_iterations={lloyd}"))
    plan = m.plan_private(dataset_size=n, opts=opts, spent=[], eps=eps, delta=delta)
    assert len(plan.events) == lloyd + 2 and plan.settings["releases"] == lloyd + 2
    assert all(isinstance(e, GaussianEvent) and e.steps == 1 for e in plan.events)
    sigma = plan.events[0].noise_multiplier
    assert {e.noise_multiplier for e in plan.events} == {sigma}
    acc = PRVAccountant(prvs=[GaussianMechanism(sigma)], max_self_compositions=[lloyd + 2], eps_error=0.01,
                        delta_error=delta / 1000)
    _, estimate, upper = acc.compute_epsilon(delta, [lloyd + 2])
    reported = compose_epsilon(list(plan.events), delta).upper
    assert upper <= eps and reported <= eps
    # k Gaussian releases of multiplier sigma compose to sqrt(k)/sigma-GDP exactly
    mu = math.sqrt(lloyd + 2) / sigma
    assert _gaussian_delta(mu, reported) <= delta * 1.01  # the reported epsilon never under-counts
    assert _gaussian_delta(mu, 0.97 * eps) > delta        # and it is calibrated, not padded


def test_a_spent_budget_is_refused_before_anything_runs():
    m = get_method("dp-gmm")
    opts = resolve_options(m, FinetuneOptions(train_opts="lloyd_iterations=3"))
    spent = [GaussianEvent(stage="select-public", noise_multiplier=0.3)]
    with pytest.raises(BudgetExhausted, match="5 moment releases"):
        m.plan_private(dataset_size=1000, opts=opts, spent=spent, eps=1.0, delta=1e-5)


@pytest.mark.parametrize("opts,word", [("lloyd_iterations=-1", "lloyd_iterations"), ("clip=0", "clip"),
                                       ("centred_clip=2", "centred_clip"), ("bandwidth=3", "bandwidth")])
def test_bad_train_opts_are_refused(opts, word):
    m = get_method("dp-gmm")
    with pytest.raises(BadInput, match=word):
        m.plan_private(dataset_size=100, opts=resolve_options(m, FinetuneOptions(train_opts=opts)), spent=[],
                       eps=1.0, delta=1e-5)


def test_bad_arch_is_refused():
    with pytest.raises(BadInput, match="rank"):
        get_method("dp-gmm", {"rank": 100}).build_generator(8, 1, 2)
    with pytest.raises(BadInput, match="components"):
        get_method("dp-gmm", {"components": 0}).build_generator(8, 1, 2)


def test_the_mixture_samples_its_components_and_rebuilds_from_its_config():
    model = GaussianMixture(GaussianMixtureConfig(resolution=4, channels=1, num_classes=2, components=2, rank=2))
    dark, bright = torch.full((16,), 0.2), torch.full((16,), 0.8)
    flat = torch.zeros(16, 16)  # no spread: every sample is its component's mean
    model.set_component(0, 0, weight=5.0, mean=dark, covariance=flat)
    model.set_component(0, 1, weight=-3.0, mean=bright, covariance=flat)  # a negative noisy count: never drawn
    model.set_component(1, 0, weight=1.0, mean=bright, covariance=flat)
    model.set_component(1, 1, weight=1.0, mean=bright, covariance=flat)
    labels = torch.tensor([0] * 50 + [1] * 50)
    images = model.sample(labels, generator=torch.Generator().manual_seed(0))
    assert images.shape == (100, 1, 4, 4) and images.dtype == torch.uint8
    assert (images[:50] == 51).all() and (images[50:] == 204).all()
    rebuilt = GaussianMixture(GaussianMixtureConfig(**model.cfg.to_dict()))
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt.sample(labels, generator=torch.Generator().manual_seed(0)), images)


def test_set_component_keeps_the_top_directions_and_the_leftover_trace():
    model = GaussianMixture(GaussianMixtureConfig(resolution=2, channels=1, num_classes=1, components=1, rank=1))
    covariance = torch.diag(torch.tensor([4.0, 0.5, 0.3, -0.2]))  # noisy: one eigenvalue below 0
    model.set_component(0, 0, weight=1.0, mean=torch.zeros(4), covariance=covariance)
    assert float(model.scales[0, 0, 0]) == pytest.approx(2.0)
    assert abs(float(model.bases[0, 0, 0, 0])) == pytest.approx(1.0)
    assert float(model.residual[0, 0]) ** 2 == pytest.approx((0.5 + 0.3 - 0.2) / 3)


def test_at_a_large_epsilon_the_fit_recovers_two_classes_and_their_modes():
    """Class 0 is two clusters (dark, mid), class 1 one bright cluster; at eps 1000 the noise is
    negligible, so the samples' pixel means per class, and class 0's two modes, come back."""
    gen = torch.Generator().manual_seed(1)
    n = 400
    level = torch.where(torch.arange(n) < n // 4, 0.1, 0.5)
    level[n // 2:] = 0.9
    images = ((level[:, None] + 0.03 * torch.randn(n, 16, generator=gen)).clamp(0, 1) * 255).round()
    images = images.to(torch.uint8).view(n, 1, 4, 4)
    labels = (torch.arange(n) >= n // 2).long()
    m = get_method("dp-gmm", {"components": 2, "rank": 2})
    opts = resolve_options(m, FinetuneOptions(train_opts="lloyd_iterations=3,clip=1.0,centred_clip=1.0"))
    plan = m.plan_private(dataset_size=n, opts=opts, spent=[], eps=1000.0, delta=1e-5)
    torch.manual_seed(0)
    model = m.train_private(m.build_generator(4, 1, 2), images, labels, opts=opts, plan=plan,
                            device=torch.device("cpu"), progress=lambda *a, **k: None).generator
    out = model.sample(torch.tensor([0] * 400 + [1] * 400), generator=torch.Generator().manual_seed(0))
    pixel_means = out.float().mean(dim=(1, 2, 3)) / 255
    assert float(pixel_means[400:].mean()) == pytest.approx(0.9, abs=0.03)
    dark = float((pixel_means[:400] < 0.3).float().mean())
    assert 0.35 < dark < 0.65  # both modes of class 0, in about their proportions
    assert float(pixel_means[:400][pixel_means[:400] < 0.3].mean()) == pytest.approx(0.1, abs=0.03)


def _invoke(*args):
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_dp_gmm_runs_all_stages_through_the_cli(tmp_path):
    run = str(tmp_path / "run")
    common = ["--run", run, "--method", "dp-gmm", "--sensitive", "fashionmnist", "--limit", "300",
              "--public-size", "60000", "--resolution", "8"]  # declared N = 300 exactly
    assert "skipped" in _invoke("select-public", *common, "--quiet")
    assert "skipped" in _invoke("pretrain", *common, "--quiet")
    _invoke("finetune", *common, "--eps", "3", "--train-opts", "lloyd_iterations=2", "--arch",
            "components=2,rank=3", "--quiet")
    _invoke("generate", "--run", run, "--n", "120", "--quiet")
    _invoke("evaluate", "--run", run, "--epochs", "1", "--quiet")
    manifest = yaml.safe_load((tmp_path / "run" / "manifest.yaml").read_text())
    events = manifest["privacy"]["events"]
    assert [e["mechanism"] for e in events] == ["gaussian"] * 4 and {e["stage"] for e in events} == {"finetune"}
    sigma = events[0]["noise_multiplier"]
    delta = manifest["privacy"]["delta"]
    acc = PRVAccountant(prvs=[GaussianMechanism(sigma)], max_self_compositions=[4], eps_error=0.01,
                        delta_error=delta / 1000)
    _, estimate, upper = acc.compute_epsilon(delta, [4])
    assert estimate - 1e-6 <= manifest["privacy"]["epsilon"] <= min(upper + 0.02, 3.0)
    synthetic = np.load(tmp_path / "run" / "synthetic.npz")
    assert synthetic["images"].shape == (120, 1, 8, 8) and synthetic["images"].dtype == np.uint8


def test_dp_sgd_flags_are_refused_and_nothing_is_written(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["finetune", "--run", str(run), "--method", "dp-gmm", "--sensitive", "fashionmnist", "--limit", "300",
                 "--public-size", "60000", "--resolution", "8", "--eps", "1", "--epochs", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "--epochs" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
