"""All five stages through the real CLI on a small real Fashion-MNIST subset."""

import json

import numpy as np
import pytest
import yaml
from prv_accountant import GaussianMechanism, PoissonSubsampledGaussianMechanism, PRVAccountant

from cli_helpers import dpsynth, snapshot

SMALL = ["--limit", "2000", "--public-size", "60000"]  # declared N = 2000 exactly


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    steps = [
        ["select-public", "--sensitive", "fashionmnist", "--public", "mnist5k", "--sigma", "8", *SMALL],
        ["pretrain", "--epochs", "1"],
        ["finetune", "--eps", "3", "--epochs", "1", "--batch-size", "250"],
        ["generate", "--n", "600"],
        ["evaluate", "--epochs", "2", "--compare-protocols"],
    ]
    outputs = {}
    for args in steps:
        result = dpsynth(*args, "--run", str(run), "--json", "--quiet")
        assert result.returncode == 0, f"{args[0]} failed:\n{result.stderr[-3000:]}"
        outputs[args[0]] = json.loads(result.stdout.strip().splitlines()[-1])
    return run, outputs


def test_manifest_records_every_stage_and_artifact(run_dir):
    run, _ = run_dir
    manifest = yaml.safe_load((run / "manifest.yaml").read_text())
    assert manifest["method"] == "privimage-cvae"
    assert manifest["sensitive"]["name"] == "fashionmnist" and manifest["sensitive"]["size"] == 2000
    assert manifest["sensitive"]["tag"].startswith("hmac-sha256:") and "fingerprint" not in manifest["sensitive"]
    assert manifest["public"]["name"] == "mnist5k"
    for stage in ("select-public", "pretrain", "finetune", "generate", "evaluate"):
        entry = manifest["stages"][stage]
        assert entry["status"] == "completed" and entry["started"] and entry["ended"]
        assert "torch" in entry["versions"] and entry["command"]
    for name in ("selection.json", "pretrained.pt", "generator.pt", "synthetic.npz", "samples.png", "results.csv"):
        assert name in manifest["artifacts"] and (run / name).is_file()
    with np.load(run / "synthetic.npz") as npz:
        assert npz["images"].dtype == np.uint8 and npz["images"].shape == (600, 1, 28, 28)
        assert sorted(set(npz["labels"].tolist())) == list(range(10))


def test_ledger_matches_an_independent_prv_computation(run_dir):
    run, outputs = run_dir
    manifest = yaml.safe_load((run / "manifest.yaml").read_text())
    privacy = manifest["privacy"]
    events = privacy["events"]
    assert [e["stage"] for e in events] == ["select-public", "finetune"]
    assert events[0]["mechanism"] == "gaussian" and events[0]["noise_multiplier"] == 8.0
    assert events[0]["sample_rate"] == 1.0 and events[0]["steps"] == 1
    fine = events[1]
    assert fine["mechanism"] == "poisson_gaussian" and fine["steps"] == 8 and fine["sample_rate"] == 1 / 8
    delta = privacy["delta"]
    assert delta == pytest.approx(1 / (2000 * np.log(2000)))
    reference = PRVAccountant(
        prvs=[GaussianMechanism(8.0), PoissonSubsampledGaussianMechanism(fine["sample_rate"], fine["noise_multiplier"])],
        max_self_compositions=[1, fine["steps"]], eps_error=0.01, delta_error=delta / 1000,
    ).compute_epsilon(delta=delta, num_self_compositions=[1, fine["steps"]])[2]
    assert privacy["accountant"] == "prv"
    assert privacy["epsilon"] == pytest.approx(reference, abs=1e-9)
    assert privacy["epsilon"] <= 3.0
    ledger = dpsynth("ledger", "--run", str(run), "--json")
    assert ledger.returncode == 0
    assert json.loads(ledger.stdout)["epsilon"] == pytest.approx(reference, abs=1e-9)


def test_evaluation_reports_accuracy_and_a_named_fid(run_dir):
    _, outputs = run_dir
    result = outputs["evaluate"]
    assert result["protocol"] == "dp-safe-selection" and result["dp_safe"] is True
    assert 0.0 <= result["accuracy"] <= 1.0
    assert result["feature_network"].startswith("querynet(mnist5k,28px,1ch):sha256:")
    assert result["fid_domain"] > 0
    assert 0.0 <= result["precision_domain"] <= 1.0 and 0.0 <= result["recall_domain"] <= 1.0
    assert result["fld_domain"] == result["fld_domain"]  # a number, not NaN
    assert "not comparable to Inception FID" in result["fid_note"]
    assert result["overstatement"] == pytest.approx(result["test_set_selection_accuracy_NOT_DP"] - result["accuracy"])


def test_compared_protocols_are_both_stored_and_the_flawed_one_is_marked(run_dir):
    run, _ = run_dir
    results = yaml.safe_load((run / "manifest.yaml").read_text())["results"]
    assert results["dp-safe-selection"]["dp_safe"] is True
    assert results["test-set-selection"]["dp_safe"] is False


def test_over_budget_finetune_is_refused_and_changes_nothing(run_dir):
    run, _ = run_dir
    before = snapshot(run)
    result = dpsynth("finetune", "--run", str(run), "--eps", "1", "--epochs", "1", "--batch-size", "250", "--quiet")
    assert result.returncode == 2
    first, *options = result.stderr.splitlines()
    assert first.startswith("error: ") and "already spent" in first and "Traceback" not in result.stderr
    assert options and all(line.startswith("  - ") for line in options)
    assert snapshot(run) == before


def test_changed_artifact_is_refused_by_the_next_stage(run_dir, tmp_path):
    run, _ = run_dir
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    with open(copy / "generator.pt", "ab") as fh:
        fh.write(b"\0")
    before = snapshot(copy)
    result = dpsynth("generate", "--run", str(copy), "--n", "10")
    assert result.returncode == 2
    assert "generator.pt changed since stage 'finetune'" in result.stderr
    assert snapshot(copy) == before
