"""The finetune contract for methods with their own mechanism (GANs, mean embeddings):
planned events are calibrated before anything is written, on disk before the mechanism
runs, ε stays within --eps, options the method lacks are refused, and a failing mechanism
leaves its events in the ledger (the release may have happened) with the stage 'failed'."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from prv_accountant import GaussianMechanism, PRVAccountant

from cli_helpers import snapshot
from dpsynth.cli.main import main
from dpsynth.methods import METHODS, PrivatePlan
from dpsynth.methods.base import Trained
from dpsynth.methods.cvae import DPCVAE
from dpsynth.privacy.plans import gaussian_release_sigma
from dpsynth.privacy.events import GaussianEvent

SEEN: dict = {}


class NoisyMeanCVAE(DPCVAE):
    """A test method: one Gaussian release of the pixel-mean sum (L2 sensitivity √(CHW), pixels
    in [0, 1]), then the decoder's bias is set from it. Records what the manifest held when
    the release happened."""

    name = "test-noisy-mean"
    own_mechanism = True
    iterative = False  # one release: no checkpoints
    finetune_defaults = {"epochs": 1, "train_opts": {"fail": 0}}

    def plan_private(self, *, dataset_size, opts, spent, eps, delta):
        sigma = gaussian_release_sigma(spent, eps, delta, stage="finetune")
        return PrivatePlan(events=(GaussianEvent(stage="finetune", noise_multiplier=sigma),),
                           settings={"noise_multiplier": sigma})

    def train_private(self, generator, images, labels, *, opts, plan, device, progress, checkpoints):
        run = Path(SEEN["run"])
        SEEN["events_on_disk"] = yaml.safe_load((run / "manifest.yaml").read_text())["privacy"]["events"]
        if opts["train_opts"]["fail"]:
            raise RuntimeError("mechanism failed")
        x = images.float() / 255.0
        total = x.sum(0) + torch.randn(x.shape[1:]) * plan.settings["noise_multiplier"] * math.sqrt(x[0].numel())
        with torch.no_grad():
            generator.decoder.up[-1].bias.fill_(float(total.mean() / len(x)))
        return Trained(generator)


@pytest.fixture
def method(monkeypatch):
    monkeypatch.setitem(METHODS, NoisyMeanCVAE.name, NoisyMeanCVAE)
    return NoisyMeanCVAE.name


def _finetune(run, *extra):
    SEEN.clear()
    SEEN["run"] = run
    return main(["finetune", "--run", str(run), "--method", "test-noisy-mean", "--sensitive", "fashionmnist",
                 "--limit", "200", "--public-size", "60000", "--resolution", "8", "--eps", "2", "--quiet", *extra])


def test_events_are_on_disk_before_the_mechanism_runs_and_fit_the_target(tmp_path, method):
    run = tmp_path / "run"
    assert _finetune(run) == 0
    events = SEEN["events_on_disk"]
    assert [(e["stage"], e["mechanism"]) for e in events] == [("finetune", "gaussian")]
    manifest = yaml.safe_load((run / "manifest.yaml").read_text())
    sigma = manifest["privacy"]["events"][0]["noise_multiplier"]
    delta = manifest["privacy"]["delta"]
    # Independent reference: prv-accountant's Gaussian mechanism called directly.
    _, estimate, upper = PRVAccountant(prvs=[GaussianMechanism(sigma)], max_self_compositions=[1], eps_error=0.01,
                                       delta_error=delta / 1000).compute_epsilon(delta, [1])
    assert estimate <= manifest["privacy"]["epsilon"] <= upper + 1e-9
    assert manifest["privacy"]["epsilon"] <= 2.0
    assert manifest["stages"]["finetune"]["status"] == "completed"
    assert manifest["stages"]["finetune"]["config"]["noise_multiplier"] == sigma


def test_a_failing_mechanism_keeps_its_event_and_marks_the_stage_failed(tmp_path, method, capsys):
    run = tmp_path / "run"
    with pytest.raises(RuntimeError):
        _finetune(run, "--train-opts", "fail=1")
    manifest = yaml.safe_load((run / "manifest.yaml").read_text())
    assert len(manifest["privacy"]["events"]) == 1  # the release may have happened: never forgotten
    assert manifest["stages"]["finetune"]["status"] == "failed"


@pytest.mark.parametrize("extra, message", [
    (["--noise-multiplicity", "2"], "has no --noise-multiplicity"),
    (["--optimizer", "efsgd"], "has no --optimizer"),
    (["--train-opts", "nosuch=1"], "--train-opts key 'nosuch'"),
    (["--train-opts", "fail"], "--train-opts item 'fail'"),
    (["--checkpoint-every", "5"], "drop --checkpoint-every"),
])
def test_options_the_method_lacks_are_refused_before_anything_is_written(tmp_path, method, capsys, extra, message):
    run = tmp_path / "run"
    assert _finetune(run, *extra) == 2
    assert message in capsys.readouterr().err
    assert snapshot(run) == {}
