"""The evaluate stage on a tiny real run (Fashion-MNIST at 8 px, 400 images, a 25% hold-out):
the hold-out fixed at creation, the noisy-val ledger entry, budget refusals that change nothing,
and the sensitive test set opened only after selection (dataset access instrumented).

References: per-class rounding of the split, 1/(N ln N), prv-accountant called directly,
the Gaussian noise scale sigma * sqrt(K), and the order of logged dataset accesses.
"""

import math
import re

import numpy as np
import pandas as pd
import pytest
import torch
from prv_accountant import GaussianMechanism, LaplaceMechanism, PRVAccountant

from cli_helpers import snapshot
from dpsynth.data import load_dataset
from dpsynth.errors import BadInput, BudgetExhausted
from dpsynth.privacy.accountant import compose_epsilon
from dpsynth.privacy.events import GaussianEvent
from dpsynth.pipeline.rundir import RunDir
from dpsynth.pipeline import evaluate as evaluate_stage
from dpsynth.pipeline.common import DataSettings, _load_full, load_holdout, load_sensitive, open_or_create_run

SETTINGS = dict(sensitive="fashionmnist", public="mnist5k", resolution=8, limit=400, seed=0)


def make_run(path, holdout=0.25, noisy_val_eps=0.5):
    """A run as the pipeline leaves it: hold-out and reservation at creation, a DP-SGD event, a synthetic set
    (here the training images plus pixel noise: evaluation mechanics, not generator quality, are tested)."""
    settings = DataSettings(**SETTINGS, holdout=holdout, noisy_val_eps=noisy_val_eps)
    run, sensitive = open_or_create_run(path, method=None, settings=settings, delta=None)
    noise = torch.randint(-20, 21, sensitive.images.shape, generator=torch.Generator().manual_seed(0))
    fake = (sensitive.images.int() + noise).clamp(0, 255).to(torch.uint8)
    with run.lock():
        event = GaussianEvent("finetune", 3.0)
        after = compose_epsilon([*run.events(), event], run.delta)
        run.manifest["privacy"]["target_epsilon"] = round(after.upper + 0.3, 3)  # room for a small charge
        run.record_event(event, after)
        run.begin_stage("generate", {}, inputs=[])
        run.write_artifact("generate", "synthetic.npz", lambda b: np.savez_compressed(
            b, images=fake.numpy(), labels=sensitive.labels.numpy()))
        run.end_stage("generate")
    return run


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("features")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DPSYNTH_FEATURE_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def run(tmp_path_factory, feature_cache):
    return make_run(tmp_path_factory.mktemp("stage") / "run")


def test_holdout_is_fixed_at_creation_and_never_trained_on(run):
    settings = DataSettings(**SETTINGS, holdout=0.25)
    full = _load_full(settings, "train")  # the keyed --limit subset, hold-out included
    manifest = RunDir.open(run.path).manifest
    trained_on = load_sensitive(settings)
    held = load_holdout(RunDir.open(run.path))
    rows = lambda images: {bytes(x.numpy().tobytes()) + bytes([int(y)]) for x, y in zip(images.images, images.labels)}
    assert not rows(trained_on) & rows(held)  # the generator never sees a hold-out image
    assert len(trained_on) + len(held) == len(full) and 0.15 < len(held) / len(full) < 0.35
    assert manifest["holdout"]["size"] == len(held) and manifest["sensitive"]["size"] == len(trained_on)
    # delta protects every sensitive image, the hold-out included.
    assert manifest["privacy"]["delta"] == pytest.approx(1 / (len(full) * math.log(len(full))))
    reserved = manifest["privacy"]["events"][0]
    assert reserved["stage"] == "evaluate" and reserved["mechanism"] == "gaussian"
    reference = PRVAccountant(prvs=[GaussianMechanism(reserved["noise_multiplier"])], max_self_compositions=[1],
                              eps_error=0.01, delta_error=run.delta / 1000
                              ).compute_epsilon(delta=run.delta, num_self_compositions=[1])[2]
    assert reserved["epsilon_after"] == pytest.approx(reference, abs=1e-9) and reference <= 0.5


def test_dp_safe_opens_the_test_set_only_after_selection(run, monkeypatch, feature_cache):
    log = []
    real_loader = evaluate_stage.load_sensitive

    def audited(settings, split="train"):
        log.append(("load", split))
        return real_loader(settings, split)

    monkeypatch.setattr(evaluate_stage, "load_sensitive", audited)
    result = evaluate_stage.run_evaluate(run.path, protocol="dp-safe-selection", epochs=2, batch_size=128,
                                         progress=lambda phase, done, total: log.append((phase, done, total)))
    fitting = [i for i, e in enumerate(log) if e[0].split()[0] in ("train", "validate")]
    test_loads = [i for i, e in enumerate(log) if e == ("load", "test")]
    assert len(test_loads) == 1 and test_loads[0] > max(fitting)

    assert result["dp_safe"] is True and 0 <= result["accuracy"] <= 1
    assert result["feature_network"].startswith("querynet(mnist5k,8px,1ch):sha256:")
    assert "fid" not in result and result["fid_domain"] >= -1e-6  # never an unnamed "fid"
    assert 1.0 <= result["is_domain"] <= 10.0  # IS lies in [1, number of classes of the network]
    assert 0 <= result["precision_domain"] <= 1 and 0 <= result["recall_domain"] <= 1
    assert result["image_reward"] is None and result["image_reward_note"].startswith("unavailable")
    table = pd.read_csv(run.path / "results.csv")
    assert table["protocol"].tolist() == ["dp-safe-selection"] and table["accuracy_cnn"].iloc[0] == result["accuracy"]
    # train, synthetic, test and public (the public-nearer check) features, and synthetic probabilities
    assert len(list(feature_cache.iterdir())) == 5


def test_noisy_val_spends_the_reservation_once_then_refuses_without_budget(run, feature_cache):
    cached = sorted(p.name for p in feature_cache.iterdir())
    events_before = list(RunDir.open(run.path).manifest["privacy"]["events"])
    result = evaluate_stage.run_evaluate(run.path, protocol="noisy-val", epochs=2, batch_size=128)
    manifest = RunDir.open(run.path).manifest
    assert manifest["privacy"]["events"] == events_before  # paid for at creation, not charged twice
    assert manifest["holdout"]["reservation_used"]
    row = manifest["results"]["noisy-val"]
    assert row["dp_safe"] is True and row["holdout_size"] == manifest["holdout"]["size"]
    sigma = events_before[0]["noise_multiplier"]
    assert row["val_noise"] == "gaussian" and row["val_noise_scale"] == pytest.approx(sigma * math.sqrt(2))
    assert 0 <= result["accuracy"] <= 1
    assert sorted(p.name for p in feature_cache.iterdir()) == cached  # same images: features from the cache

    before = snapshot(run.path)
    with pytest.raises(BudgetExhausted, match="reserved none"):
        evaluate_stage.run_evaluate(run.path, protocol="noisy-val", epochs=2)
    with pytest.raises(BudgetExhausted, match="cannot run within the run's target") as refused:
        evaluate_stage.run_evaluate(run.path, protocol="noisy-val", epochs=2, val_eps=5.0)
    assert snapshot(run.path) == before
    # Its first option, the largest `val_eps` that fits, really plans within the target (prv-accountant directly).
    room = float(re.search(r"in this run: `val_eps` (\S+) or less", str(refused.value)).group(1))
    planned = evaluate_stage._plan_noisy_val(RunDir.open(run.path), 2, room, "laplace")["event"]
    privacy = RunDir.open(run.path).manifest["privacy"]
    prvs = [GaussianMechanism(e["noise_multiplier"]) for e in events_before] + [LaplaceMechanism(planned.epsilon0)]
    counts = [1] * len(events_before) + [planned.steps]
    reference = PRVAccountant(prvs=prvs, max_self_compositions=counts, eps_error=0.01,
                              delta_error=privacy["delta"] / 1000).compute_epsilon(privacy["delta"], counts)[2]
    assert planned.steps == 2 and room > 0 and reference <= privacy["target_epsilon"]
    # A comparison still runs the two free protocols and says why noisy-val is missing.
    compared = evaluate_stage.run_evaluate(run.path, compare_protocols=True, epochs=1, batch_size=128)
    assert compared["noisy-val"].startswith("unavailable: ") and "reserved none" in compared["noisy-val"]
    assert compared["overstatement"] == pytest.approx(compared["test_set_selection_accuracy_NOT_DP"]
                                                      - compared["accuracy"]) and compared["overstatement"] >= 0
    assert RunDir.open(run.path).manifest["privacy"]["events"] == events_before


def test_a_charge_that_fits_the_target_is_recorded_before_the_counts(tmp_path, feature_cache, monkeypatch):
    fresh = make_run(tmp_path / "fresh", noisy_val_eps=None)
    target = fresh.manifest["privacy"]["target_epsilon"]
    seen = {}
    real = evaluate_stage.evaluate_protocols

    def spy(*args, **kwargs):  # what the ledger on disk says when the noisy counts are about to be made
        seen["events"] = RunDir.open(fresh.path).manifest["privacy"]["events"]
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate_stage, "evaluate_protocols", spy)
    evaluate_stage.run_evaluate(fresh.path, protocol="noisy-val", epochs=1, val_eps=0.2, val_noise="laplace")
    last = seen["events"][-1]
    assert last["stage"] == "evaluate" and last["mechanism"] == "laplace"
    assert last["steps"] == 1 and last["epsilon0"] == pytest.approx(0.2)
    assert RunDir.open(fresh.path).manifest["privacy"]["epsilon"] <= target


def test_noisy_val_without_a_holdout_is_bad_input_and_changes_nothing(tmp_path, capsys):
    bare = make_run(tmp_path / "bare", holdout=0.0, noisy_val_eps=None)
    before = snapshot(bare.path)
    from dpsynth.cli.main import main
    assert main(["evaluate", "--run", str(bare.path), "--protocol", "noisy-val"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no sensitive hold-out" in err[0] and "--holdout" in err[0]
    assert snapshot(bare.path) == before
    with pytest.raises(BadInput, match="fixed at creation"):
        open_or_create_run(bare.path, method=None, settings=DataSettings(**SETTINGS, holdout=0.1), delta=None)
    assert snapshot(bare.path) == before
    with pytest.raises(BadInput, match="holdout=0.9"):
        DataSettings(**SETTINGS, holdout=0.9)
    with pytest.raises(BadInput, match="needs a sensitive hold-out"):
        DataSettings(**SETTINGS, noisy_val_eps=0.1)


def test_inception_weights_that_cannot_be_clean_fids_file_are_refused(run, tmp_path):
    before = snapshot(run.path)
    with pytest.raises(BadInput, match="must be clean-fid's file named inception-2015-12-05.pt"):
        evaluate_stage.run_evaluate(run.path, inception_weights=str(tmp_path / "weights.pt"))
    with pytest.raises(BadInput, match="does not exist or is empty"):
        evaluate_stage.run_evaluate(run.path, inception_weights=str(tmp_path / "inception-2015-12-05.pt"))
    assert snapshot(run.path) == before


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
def test_evaluate_runs_on_the_given_device_and_records_it(run, feature_cache, capsys, device):
    from dpsynth.cli.main import main

    code = main(["evaluate", "--run", str(run.path), "--device", device, "--epochs", "1", "--batch-size", "128",
                 "--quiet", "--json"])
    assert code == 0, capsys.readouterr().err
    config = RunDir.open(run.path).manifest["stages"]["evaluate"]["config"]
    assert config["device"] == ("cpu" if device == "cpu" else "cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_evaluate_on_a_gpu_without_one_is_bad_input(run, capsys):
    from dpsynth.cli.main import main

    before = snapshot(run.path)
    assert main(["evaluate", "--run", str(run.path), "--device", "cuda"]) == 2
    assert "--device cuda asked for a GPU" in capsys.readouterr().err
    assert snapshot(run.path) == before


def test_evaluate_fails_after_its_noisy_val_event_and_keeps_it(tmp_path, feature_cache, monkeypatch):
    """A crash after the noisy-val event is written ends the stage `failed` (never `running`),
    and the event stays in the ledger: the hold-out was read."""
    run = make_run(tmp_path / "run")
    before = len(run.events())

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(evaluate_stage, "evaluate_protocols", boom)
    with pytest.raises(RuntimeError, match="boom"):
        evaluate_stage.run_evaluate(run.path, protocol="noisy-val", val_eps=0.1, epochs=1, batch_size=128)
    manifest = RunDir.open(run.path).manifest
    assert manifest["stages"]["evaluate"]["status"] == "failed"
    events = manifest["privacy"]["events"]
    assert len(events) == before + 1 and events[-1]["stage"] == "evaluate" and "noisy-val" in events[-1]["note"]
    assert not (run.path / ".lock").exists()
