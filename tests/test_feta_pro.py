"""FETA-Pro: three ledger events in order (central images, frequency release, DP-SGD), the
composition's epsilon against prv-accountant's own mechanisms, DP-SGD calibrated on what the two
warm-up releases spent, both warm-up events on disk before either release runs, the warm-up
order option, and the five stages through the CLI."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from prv_accountant import PRVAccountant
from prv_accountant.privacy_random_variables import GaussianMechanism, PoissonSubsampledGaussianMechanism

import dpsynth.methods.feta_pro as feta_pro
from dpsynth.cli.main import main
from dpsynth.errors import BadInput
from dpsynth.methods import get_method
from dpsynth.privacy.accountant import compose_epsilon
from dpsynth.training.options import FinetuneOptions, resolve_options

N = 55_000  # DPImageBench's Fashion-MNIST training split after its 5,000-image validation split
DELTA = 1.0 / (N * math.log(N))


def _independent(events, delta: float = DELTA) -> tuple[float, float]:
    """(estimate, upper) of the composition, from prv-accountant's own mechanisms only."""
    prvs, steps = [], []
    for e in events:
        e = e if isinstance(e, dict) else e.to_dict()
        if e["mechanism"] == "gaussian":
            prvs.append(GaussianMechanism(e["noise_multiplier"]))
        else:
            assert e["mechanism"] == "poisson_gaussian"
            prvs.append(PoissonSubsampledGaussianMechanism(e["sample_rate"], e["noise_multiplier"]))
        steps.append(int(e["steps"]))
    acc = PRVAccountant(prvs=prvs, max_self_compositions=steps, eps_error=0.01, delta_error=delta / 1000)
    _, estimate, upper = acc.compute_epsilon(delta, steps)
    return estimate, upper


def _warmup(method, central_sigma=5.0, freq_sigma=7.4, order=None, **extra):
    options = {"freq_sigma": freq_sigma, "warmup_order": order, **extra}
    return method.plan_warmup(dataset_size=N, sigma=central_sigma, queries=5, batch=6000, spent=[], delta=DELTA,
                              target=None, epochs=1000, batch_size=50, augment=True, options=options)


def _dpsgd(method, spent, eps=10.0):
    opts = resolve_options(method, FinetuneOptions(epochs=2, batch_size=4096))  # 13 steps per epoch
    return method.plan_private(dataset_size=N, opts=opts, spent=list(spent), eps=eps, delta=DELTA)


@functools.lru_cache(maxsize=None)
def _authors_split():
    """The authors' Fashion-MNIST eps=10 warm-up (sigma_time 5, sigma_freq 7.4) and the DP-SGD
    planned after it: one calibration (~15 PRV evaluations), shared by two tests."""
    method = get_method("feta-pro")
    warm = _warmup(method)
    return warm, _dpsgd(method, warm.events)


def test_three_events_in_order_and_their_epsilon_is_prv_accountants():
    warm, plan = _authors_split()
    central, freq = warm.events
    assert (central.mechanism, central.noise_multiplier, central.sample_rate, central.steps) == \
        ("poisson_gaussian", 5.0, pytest.approx(1 / math.ceil(N / 6000)), 5)
    assert (freq.mechanism, freq.noise_multiplier, freq.steps) == ("gaussian", 7.4, 1)
    (dpsgd,) = plan.events
    assert (dpsgd.mechanism, dpsgd.sample_rate, dpsgd.steps) == ("poisson_gaussian", pytest.approx(1 / 13), 26)
    events = [central, freq, dpsgd]
    estimate, upper = _independent(events)
    reported = compose_epsilon(events, DELTA).upper
    assert estimate - 1e-6 <= reported <= upper + 0.02
    assert upper <= 10.0 + 0.02 and reported <= 10.0
    # The warm-up alone, by prv-accountant: the authors' split leaves most of eps=10 to DP-SGD.
    warm_estimate, warm_upper = _independent([central, freq])
    assert warm_estimate - 1e-6 <= compose_epsilon([central, freq], DELTA).upper <= warm_upper + 0.02
    assert 0.3 < warm_upper < 1.5


def test_dp_sgd_is_calibrated_after_the_two_warmup_releases():
    """A costlier warm-up (less noise on both releases) leaves less for DP-SGD: more noise there,
    and the whole composition still fits the target."""
    method = get_method("feta-pro")
    default_warm, default_plan = _authors_split()
    costly_warm = _warmup(method, central_sigma=2.0, freq_sigma=2.0)
    (costly,) = _dpsgd(method, costly_warm.events).events
    (default,) = default_plan.events
    assert _independent(costly_warm.events)[0] > _independent(default_warm.events)[1]  # costlier indeed
    assert costly.noise_multiplier > default.noise_multiplier * 1.005  # beyond the bisection's 2e-3
    _, upper = _independent([*costly_warm.events, costly])
    assert upper <= 10.0 + 0.02


def test_warmup_order_decides_the_releases_and_a_bad_one_is_refused():
    method = get_method("feta-pro")
    mechanisms = lambda plan: [e.mechanism for e in plan.events]  # noqa: E731
    assert mechanisms(_warmup(method)) == ["poisson_gaussian", "gaussian"]  # default time_freq
    assert _warmup(method).settings["warmup_order"] == "time_freq"
    assert mechanisms(_warmup(method, order="freq_time")) == ["poisson_gaussian", "gaussian"]
    assert mechanisms(_warmup(method, order="mix")) == ["poisson_gaussian", "gaussian"]
    assert mechanisms(_warmup(method, order="time")) == ["poisson_gaussian"]  # no release that is not used
    assert mechanisms(_warmup(method, order="freq")) == ["gaussian"]
    with pytest.raises(BadInput, match="warmup_order='spectral'.*time_freq"):
        _warmup(method, order="spectral")
    with pytest.raises(BadInput, match="aux_opts.*'depth'"):
        _warmup(method, aux_opts={"depth": 3})
    with pytest.raises(BadInput, match="freq_sigma"):
        _warmup(method, freq_sigma=0.0)
    with pytest.raises(BadInput, match="warmup_order"):  # dp-feta has no frequency warm-up
        _warmup(get_method("dp-feta"), freq_sigma=None, order="time_freq")


def test_warmup_sets_follow_the_order():
    method = get_method("feta-pro")
    s = _warmup(method, order="time_freq").settings
    central = (torch.zeros(20, 1, 8, 8, dtype=torch.uint8), torch.arange(20) % 10)
    auxiliary = (torch.ones(30, 1, 8, 8, dtype=torch.uint8), torch.arange(30) % 10)
    names = lambda order: [w.name for w in method._ordered_sets({**s, "warmup_order": order}, central, auxiliary)]  # noqa: E731
    assert names("time_freq") == ["central images", "auxiliary images"]
    assert names("freq_time") == ["auxiliary images", "central images"]
    (mixed,) = method._ordered_sets({**s, "warmup_order": "mix"}, central, auxiliary)
    assert len(mixed.images) == 50 and mixed.epochs == s["freq_epochs"]


TINY = ["--method", "feta-pro", "--sensitive", "fashionmnist", "--limit", "300", "--public-size", "60000",
        "--resolution", "8"]
PRETRAIN = ["--epochs", "2", "--batch-size", "25", "--arch", "width=4,ch_mult=1:2,num_res_blocks=1",
            "--central-batch", "100", "--freq-epochs", "1", "--freq-batch-size", "64",
            "--aux-opts", "features=64,epochs=1,batch_size=60,images=100,hidden=16,width=4,latent_dim=8", "--quiet"]


def test_a_bad_warmup_order_exits_2_in_one_line_and_writes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "--run", str(run), *TINY, *PRETRAIN, "--warmup-order", "spectral"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--warmup-order" in err and "'spectral'" in err and "time_freq" in err
    assert not run.exists()


def test_both_warmup_events_are_on_disk_before_the_frequency_release_runs(tmp_path, monkeypatch):
    run = tmp_path / "run"
    seen = {}

    def release_then_fail(*args, **kwargs):
        seen["events"] = [e["mechanism"] for e in yaml.safe_load((run / "manifest.yaml").read_text())["privacy"]["events"]]
        raise RuntimeError("injected after the events, before the release")

    monkeypatch.setattr(feta_pro, "noisy_sum", release_then_fail)
    with pytest.raises(RuntimeError, match="injected"):
        main(["pretrain", "--run", str(run), *TINY, *PRETRAIN])
    assert seen["events"] == ["poisson_gaussian", "gaussian"]
    manifest = yaml.safe_load((run / "manifest.yaml").read_text())
    assert manifest["stages"]["pretrain"]["status"] == "failed"
    assert len(manifest["privacy"]["events"]) == 2  # the access happened: kept
    assert not (run / "auxiliary.pt").exists()


def test_all_five_stages_through_the_cli(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["select-public", "--run", run, *TINY, "--quiet"]) == 0  # not used: says so, writes nothing
    assert main(["pretrain", "--run", run, *TINY, *PRETRAIN]) == 0
    assert main(["finetune", "--run", run, "--eps", "6", "--epochs", "1", "--batch-size", "100", "-K", "2",
                 "--physical-batch-size", "50", "--quiet"]) == 0
    assert main(["generate", "--run", run, "--n", "120", "--steps", "2", "--quiet"]) == 0
    assert main(["evaluate", "--run", run, "--epochs", "1", "--quiet"]) == 0
    capsys.readouterr()
    manifest = yaml.safe_load((tmp_path / "run" / "manifest.yaml").read_text())
    events = manifest["privacy"]["events"]
    assert [(e["stage"], e["mechanism"]) for e in events] == [
        ("pretrain", "poisson_gaussian"), ("pretrain", "gaussian"), ("finetune", "poisson_gaussian")]
    assert events[0]["noise_multiplier"] == 5.0 and events[1]["noise_multiplier"] == 7.4
    assert manifest["stages"]["finetune"]["config"]["events_before"] == 2  # calibrated after the warm-up
    estimate, upper = _independent(events, manifest["privacy"]["delta"])
    reported = manifest["privacy"]["epsilon"]
    assert estimate - 1e-6 <= reported <= upper + 0.02 and reported <= 6.0
    outputs = manifest["stages"]["pretrain"]["outputs"]
    assert {"central_images.npz", "auxiliary.pt", "pretrained.pt"} <= set(outputs)
    central = np.load(tmp_path / "run" / "central_images.npz")
    assert central["images"].shape == (50, 1, 8, 8)  # 5 queries x 10 classes
    assert np.load(tmp_path / "run" / "synthetic.npz")["images"].shape == (120, 1, 8, 8)


RECIPES = sorted((Path(__file__).parent.parent / "recipes" / "feta-pro").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_feta_pro_recipe_passes_the_warmup_checks(path):
    recipe = yaml.safe_load(path.read_text())
    pre = recipe["pretrain"]
    options = get_method("feta-pro").warmup_options({
        "freq_sigma": pre["freq-sigma"], "warmup_order": pre["warmup-order"], "freq_epochs": pre["freq-epochs"],
        "freq_batch_size": pre["freq-batch-size"], "aux_opts": pre["aux-opts"]})
    assert options["warmup_order"] == "time_freq"
    assert recipe["finetune"]["eps"] in (1, 10) and pre["central-queries"] == 5 and pre["central-batch"] == 6000
    assert ("-eps1" in path.name) == (recipe["finetune"]["eps"] == 1)


# ---- aux kind=gmm: dp-gmm's mixture as the auxiliary generator (dpsynth's variant) --------------------------

GMM_AUX = {"kind": "gmm", "components": 2, "rank": 3, "lloyd_iterations": 3, "images": 100}


def test_gmm_auxiliary_releases_cost_what_one_release_of_freq_sigma_costs():
    """2 + lloyd_iterations Gaussian releases of sigma*sqrt(k) each: by prv-accountant, the same
    epsilon as one release of sigma (Gaussians compose exactly: sqrt(k)/sigma_each = 1/sigma)."""
    method = get_method("feta-pro")
    plan = _warmup(method, aux_opts=GMM_AUX)
    central, *gmm = plan.events
    assert central.mechanism == "poisson_gaussian" and len(gmm) == 5
    assert all(e.mechanism == "gaussian" and e.steps == 1 for e in gmm)
    assert all(e.noise_multiplier == pytest.approx(7.4 * math.sqrt(5)) for e in gmm)
    assert plan.settings["aux_opts"]["kind"] == "gmm" and plan.settings["gmm_releases"] == 5
    one_release = PRVAccountant(prvs=[PoissonSubsampledGaussianMechanism(central.sample_rate, 5.0),
                                      GaussianMechanism(7.4)], max_self_compositions=[5, 1], eps_error=0.01,
                                delta_error=DELTA / 1000)
    _, single_estimate, single_upper = one_release.compute_epsilon(DELTA, [5, 1])
    estimate, upper = _independent(plan.events)
    assert abs(estimate - single_estimate) < 0.03 and upper <= single_upper + 0.03
    reported = compose_epsilon(plan.events, DELTA).upper
    assert estimate - 1e-6 <= reported <= upper + 0.02
    # No lloyd steps: two releases, each sigma*sqrt(2).
    (_, *two) = _warmup(method, aux_opts={**GMM_AUX, "lloyd_iterations": 0}).events
    assert [e.noise_multiplier for e in two] == [pytest.approx(7.4 * math.sqrt(2))] * 2


def test_aux_kind_and_its_keys_are_checked():
    method = get_method("feta-pro")
    with pytest.raises(BadInput, match="kind: 'pca'.*rff, gmm"):
        _warmup(method, aux_opts={"kind": "pca"})
    with pytest.raises(BadInput, match="'features'.*gmm.*components"):  # an rff key with kind=gmm
        _warmup(method, aux_opts={"kind": "gmm", "features": 100})
    with pytest.raises(BadInput, match="'components'.*rff"):  # and the other way round
        _warmup(method, aux_opts={"components": 4})
    with pytest.raises(BadInput, match="lloyd_iterations=-1"):
        _warmup(method, aux_opts={"kind": "gmm", "lloyd_iterations": -1})
    with pytest.raises(BadInput, match="centred_clip=1.5"):
        _warmup(method, aux_opts={"kind": "gmm", "centred_clip": 1.5})
    with pytest.raises(BadInput, match="rank: 0"):
        _warmup(method, aux_opts={"kind": "gmm", "rank": 0})
    assert _warmup(method).settings["aux_opts"]["kind"] == "rff"  # the authors' release stays the default


GMM_PRETRAIN = [*PRETRAIN[:PRETRAIN.index("--aux-opts")], "--aux-opts",
                "kind=gmm,components=2,rank=3,lloyd_iterations=1,images=100", "--quiet"]


def test_gmm_auxiliary_events_are_on_disk_before_its_releases_run(tmp_path, monkeypatch):
    run = tmp_path / "run"
    seen = {}

    def fit_then_fail(*args, **kwargs):
        seen["events"] = [e["mechanism"] for e in yaml.safe_load((run / "manifest.yaml").read_text())["privacy"]["events"]]
        raise RuntimeError("injected after the events, before the releases")

    monkeypatch.setattr(feta_pro, "fit_mixture", fit_then_fail)
    with pytest.raises(RuntimeError, match="injected"):
        main(["pretrain", "--run", str(run), *TINY, *GMM_PRETRAIN])
    assert seen["events"] == ["poisson_gaussian", "gaussian", "gaussian", "gaussian"]
    assert not (run / "auxiliary.pt").exists()


def test_five_stages_with_the_gmm_auxiliary(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["pretrain", "--run", run, *TINY, *GMM_PRETRAIN, "--json"]) == 0
    sets = json.loads(capsys.readouterr().out)["warmup_sets"]
    assert [(s["name"], s["images"]) for s in sets] == [("central images", 50), ("auxiliary images", 100)]
    assert main(["finetune", "--run", run, "--eps", "8", "--epochs", "1", "--batch-size", "100",
                 "--physical-batch-size", "50", "--quiet"]) == 0
    assert main(["generate", "--run", run, "--n", "60", "--steps", "2", "--quiet"]) == 0
    capsys.readouterr()
    manifest = yaml.safe_load((tmp_path / "run" / "manifest.yaml").read_text())
    events = manifest["privacy"]["events"]
    assert [e["mechanism"] for e in events] == ["poisson_gaussian", "gaussian", "gaussian", "gaussian",
                                                "poisson_gaussian"]
    assert [e["noise_multiplier"] for e in events[1:4]] == [pytest.approx(7.4 * math.sqrt(3))] * 3
    estimate, upper = _independent(events, manifest["privacy"]["delta"])
    assert estimate - 1e-6 <= manifest["privacy"]["epsilon"] <= upper + 0.02 and manifest["privacy"]["epsilon"] <= 8
    saved = torch.load(tmp_path / "run" / "auxiliary.pt", weights_only=True)
    assert saved["config"]["components"] == 2 and saved["config"]["rank"] == 3
