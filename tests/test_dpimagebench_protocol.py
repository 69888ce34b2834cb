"""DPImageBench's own accuracy protocol, offered as a named NOT-DP comparison (dpimagebench-val).

References: FETA-Pro's published log (87.80 = mean of 87.78 / 88.17 / 87.46, DPImageBench's evaluator),
test-set selection on the same split (the two rules must then agree exactly), and the run's
ledger, which a NOT-DP comparison must leave untouched."""

import pytest
import torch

from cli_helpers import snapshot
from dpsynth.errors import BadInput
from dpsynth.evaluation.results import ProtocolResult
from dpsynth.evaluation.selection import DPIMAGEBENCH_VAL, TEST_SET, is_dp_safe
from dpsynth.evaluation.utility import evaluate_protocols
from dpsynth.pipeline import evaluate as evaluate_stage
from dpsynth.pipeline.common import load_holdout
from dpsynth.pipeline.rundir import RunDir
from test_evaluate_stage import feature_cache, make_run  # noqa: F401 (a fixture)


def test_headline_is_the_mean_of_the_three_as_in_the_published_log():
    published = {"resnet": 0.8778, "wrn": 0.8817, "resnext": 0.8746}  # FETA-Pro, F-MNIST eps=10: 87.80
    result = ProtocolResult(protocol=DPIMAGEBENCH_VAL, accuracies=published,
                            selected_epochs={c: 1 for c in published}, scores={c: [0.5] for c in published},
                            train_size=55000, val_size=5000, epochs=1, holdout_size=5000)
    assert round(100 * result.accuracy_mean, 2) == 87.80
    assert result.accuracy_best == 0.8817 and not result.dp_safe and not is_dp_safe(DPIMAGEBENCH_VAL)


def test_selection_on_a_sensitive_split_equal_to_the_test_set_is_test_set_selection():
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat(30)
    images = (labels.view(-1, 1, 1, 1) * 50 + torch.randint(0, 60, (120, 1, 8, 8), generator=gen)).clamp(0, 255)
    images = images.to(torch.uint8)
    test_x, test_y = images[:60].clone(), labels[:60].clone()
    results = evaluate_protocols(images, labels, lambda: (test_x, test_y), 4, protocols=(TEST_SET, DPIMAGEBENCH_VAL),
                                 sensitive_val=(test_x, test_y), epochs=4, batch_size=32)
    dpib, flawed = results[DPIMAGEBENCH_VAL], results[TEST_SET]
    assert dpib.scores == flawed.scores and dpib.selected_epochs == flawed.selected_epochs
    assert dpib.accuracies == pytest.approx(flawed.accuracies, abs=1e-12) and dpib.holdout_size == 60
    with pytest.raises(BadInput, match="sensitive_val"):
        evaluate_protocols(images, labels, lambda: (test_x, test_y), 4, protocols=(DPIMAGEBENCH_VAL,), epochs=1)


def test_the_stage_marks_it_not_dp_and_charges_nothing(tmp_path, feature_cache):
    run = make_run(tmp_path / "run")
    events = list(RunDir.open(run.path).manifest["privacy"]["events"])
    result = evaluate_stage.run_evaluate(run.path, protocol=DPIMAGEBENCH_VAL, epochs=2, batch_size=128)
    manifest = RunDir.open(run.path).manifest
    row = manifest["results"][DPIMAGEBENCH_VAL]
    assert manifest["privacy"]["events"] == events  # no ledger event: it is declared NOT DP instead
    assert row["dp_safe"] is False and row["not_dp"].startswith("NOT DP") and "DPImageBench" in row["not_dp"]
    assert row["holdout_size"] == len(load_holdout(RunDir.open(run.path))) == manifest["holdout"]["size"]
    assert row["dpimagebench_classifiers"] is False  # cnn alone is not DPImageBench's three
    per = [v["accuracy"] for v in row["per_classifier"].values()]
    assert result["accuracy"] == pytest.approx(sum(per) / len(per)) == row["accuracy_mean"]
    assert "mean over the classifiers" in row["accuracy_note"]


def test_a_run_without_hold_out_is_refused_and_unchanged(tmp_path, feature_cache):
    run = make_run(tmp_path / "bare", holdout=0.0, noisy_val_eps=None)
    before = snapshot(run.path)
    with pytest.raises(BadInput, match="dpimagebench-val needs one"):
        evaluate_stage.run_evaluate(run.path, protocol=DPIMAGEBENCH_VAL, epochs=1)
    assert snapshot(run.path) == before
