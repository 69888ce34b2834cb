"""Test accuracy on a user's own data: `npz:` runs serve one file as both splits, so `evaluate`
refuses test accuracy unless `--sensitive-test` names a disjoint set, and scores that set when it
does; every mismatched test set is one line, exit 2, nothing changed. Also the line under the
tables saying what the ledger does not account for.

References: Fashion-MNIST train and test images at 8 px written to .npz files by hand, and the
snapshot of the run directory before and after each refusal.
"""

import numpy as np
import pytest
import torch

from cli_helpers import snapshot
from dpsynth.cli.main import main
from dpsynth.data import load_dataset
from dpsynth.data.common import has_disjoint_test
from dpsynth.errors import BadInput
from dpsynth.reporting import NOT_ACCOUNTED
from dpsynth.pipeline.rundir import RunDir
from dpsynth.pipeline import evaluate as evaluate_stage
from dpsynth.pipeline.common import DataSettings, open_or_create_run


def write_npz(path, split, n, labels=None, images=None):
    data = load_dataset("fashionmnist", split, resolution=8, limit=n, seed=0)
    np.savez(path, images=(data.images.numpy() if images is None else images),
             labels=(data.labels.numpy() if labels is None else labels))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("npz")
    return {"train": write_npz(root / "train.npz", "train", 400), "test": write_npz(root / "test.npz", "test", 200)}


def make_run(path, train, sensitive_test=None):
    """An npz run with a synthetic set (training images plus pixel noise), as generate leaves it."""
    settings = DataSettings(sensitive=f"npz:{train}", public="mnist5k", seed=0, sensitive_test=sensitive_test)
    run, sensitive = open_or_create_run(path, method=None, settings=settings, delta=None)
    noise = torch.randint(-20, 21, sensitive.images.shape, generator=torch.Generator().manual_seed(0))
    fake = (sensitive.images.int() + noise).clamp(0, 255).to(torch.uint8)
    with run.lock():
        run.begin_stage("generate", {}, inputs=[])
        run.write_artifact("generate", "synthetic.npz", lambda b: np.savez_compressed(
            b, images=fake.numpy(), labels=sensitive.labels.numpy()))
        run.end_stage("generate")
    return run


@pytest.fixture(scope="module")
def run(tmp_path_factory, files):
    return make_run(tmp_path_factory.mktemp("run") / "run", files["train"])


def refuses(capsys, path, *args):
    """The command exits 2 with one line on stderr and leaves `path` as it was; returns that line."""
    before = snapshot(path)
    assert main(list(args)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert snapshot(path) == before
    return lines[0]


def test_which_sets_have_a_disjoint_test_split():
    assert has_disjoint_test("fashionmnist") and has_disjoint_test("FashionMNIST") and has_disjoint_test("camelyon")
    assert not any(has_disjoint_test(n) for n in ("npz:/x.npz", "NPZ:/x.npz", "imagefolder:/d", "digits", "mnist5k"))


def test_npz_run_without_a_test_set_refuses_test_accuracy(run, capsys):
    line = refuses(capsys, run.path, "evaluate", "--run", str(run.path), "--epochs", "1")
    assert "--sensitive-test" in line and "npz:" in line and "no test set disjoint" in line
    # Every protocol needs the test set, the comparison included.
    line = refuses(capsys, run.path, "evaluate", "--run", str(run.path), "--compare-protocols")
    assert "--sensitive-test" in line


def test_with_sensitive_test_it_scores_the_given_file_and_records_it(run, files, capsys):
    log = []
    real_load = evaluate_stage.load_sensitive_test

    def audited(spec, settings, train):
        log.append(spec)
        return real_load(spec, settings, train)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluate_stage, "load_sensitive_test", audited)
        assert main(["evaluate", "--run", str(run.path), "--epochs", "1", "--batch-size", "128",
                     "--sensitive-test", f"npz:{files['test']}"]) == 0
    out = capsys.readouterr().out
    assert log == [f"npz:{files['test']}"]
    assert out.strip().splitlines()[-1] == NOT_ACCOUNTED  # the line under the table
    manifest = RunDir.open(run.path).manifest
    row = manifest["results"]["dp-safe-selection"]
    assert row["test_set"] == f"npz:{files['test']} (200 images, the test set given for this run)"
    assert 0 <= row["accuracy"] <= 1 and row["fld_samples"] > 0
    assert row["fid_reference"].startswith("sensitive training set: npz:")
    assert manifest["stages"]["evaluate"]["config"]["sensitive_test"] == f"npz:{files['test']}"
    assert "sensitive_test" not in manifest["settings"] or manifest["settings"]["sensitive_test"] is None


@pytest.mark.parametrize("case", ["shape", "channels", "classes", "unlabelled", "itself", "missing", "single-split"])
def test_a_test_set_unlike_the_training_set_is_one_line(run, files, tmp_path, capsys, case):
    train = load_dataset("fashionmnist", "test", resolution=8, limit=200, seed=0)
    path = tmp_path / f"{case}.npz"
    if case == "shape":
        write_npz(path, "test", 200, images=load_dataset("fashionmnist", "test", resolution=12, limit=200,
                                                         seed=0).images.numpy())
    elif case == "channels":
        write_npz(path, "test", 200, images=np.repeat(train.images.numpy(), 3, axis=1))
    elif case == "classes":
        write_npz(path, "test", 200, labels=train.labels.numpy() % 5)
    elif case == "unlabelled":
        np.savez(path, images=train.images.numpy())
    spec = {"itself": f"npz:{files['train']}", "single-split": "digits"}.get(case, f"npz:{path}")
    line = refuses(capsys, run.path, "evaluate", "--run", str(run.path), "--sensitive-test", spec)
    assert line.startswith(f"error: --sensitive-test {spec}")
    expected = {"shape": "1x12x12 (CxHxW) images but the run's training images are 1x8x8",
                "channels": "3x8x8", "classes": "5 classes but the training set has 10",
                "unlabelled": "has no labels", "itself": "is the training set itself",
                "missing": "not found", "single-split": "has only a train split"}[case]
    assert expected in line


def test_recorded_at_creation_and_used_by_evaluate(tmp_path, files, capsys):
    created = make_run(tmp_path / "run", files["train"], sensitive_test=f"npz:{files['test']}")
    assert RunDir.open(created.path).manifest["settings"]["sensitive_test"] == f"npz:{files['test']}"
    result = evaluate_stage.run_evaluate(created.path, epochs=1, batch_size=128)
    assert result["test_set"].startswith(f"npz:{files['test']} (200 images")
    # Fixed at creation: another one on a later stage is refused, and without --sensitive it is too.
    with pytest.raises(BadInput, match="recorded at creation"):
        open_or_create_run(created.path, method=None, delta=None,
                           settings=DataSettings(sensitive=f"npz:{files['train']}", public="mnist5k",
                                                 sensitive_test=f"npz:{files['train']}"))
    line = refuses(capsys, created.path, "finetune", "--run", str(created.path), "--eps", "1",
                   "--sensitive-test", f"npz:{files['test']}")
    assert "dpsynth evaluate --sensitive-test" in line


def test_a_bad_test_set_at_creation_creates_nothing(tmp_path, files, capsys):
    bad = write_npz(tmp_path / "bad.npz", "test", 50, labels=np.zeros(50, dtype=np.int64))
    target = tmp_path / "new"
    line = refuses(capsys, target, "select-public", "--run", str(target), "--sensitive", f"npz:{files['train']}",
                   "--sigma", "5", "--sensitive-test", f"npz:{bad}")
    assert "1 classes but the training set has 10" in line and not target.exists()


def test_fidelity_only_runs_without_a_test_set(tmp_path, files):
    bare = make_run(tmp_path / "run", files["train"])
    result = evaluate_stage.run_evaluate(bare.path, fidelity_only=True)
    assert result["accuracy"] is None and result["fld_domain"] is None and result["fld_samples"] == 0
    assert result["fid_domain"] >= -1e-6 and result["test_set"].startswith("none:")
    assert list(RunDir.open(bare.path).manifest["results"]) == ["fidelity-only"]
    with pytest.raises(BadInput, match="`fidelity_only` trains no classifier"):
        evaluate_stage.run_evaluate(bare.path, fidelity_only=True, compare_protocols=True)
