"""Finetune defaults adapted to a small declared N (issue 16): the batch size and epochs the user
did not set are scaled so that q = B/N <= 0.1 and DP-SGD takes enough steps; at N = 60,000 (what
the defaults are sized for) nothing changes; a value the user set never changes; the stage records
the adapted values and plans its event on them."""

from __future__ import annotations

import math

import pytest
import yaml

import dpsynth.methods  # noqa: F401  (registers every method)
from dpsynth.cli.main import main
from dpsynth.methods import get_method
from dpsynth.methods.registry import METHODS
from dpsynth.pipeline.rundir import MANIFEST
from dpsynth.privacy.plans import DPSGDPlan
from dpsynth.training.options import FinetuneOptions, method_defaults, resolve_options

ADAPTING = sorted(n for n, cls in METHODS.items() if cls.adapts_to_size)


def _resolved(name: str, n: int | None, **given):
    return resolve_options(get_method(name), FinetuneOptions(**given), dataset_size=n)


@pytest.mark.parametrize("n", [60_000, 162_770])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_at_the_reference_size_and_above_every_default_is_exactly_unchanged(name, n):
    plain, sized = _resolved(name, None), _resolved(name, n)
    assert sized == plain and sized.record() == plain.record()
    assert sized.adapted == () and sized.notes == plain.notes


def test_the_methods_that_adapt_are_those_with_a_dpsgd_schedule():
    assert {"dp-cvae", "privimage-cvae", "dpdm", "privimage", "dp-ldm", "dp-lora", "dp-gan"} <= set(ADAPTING)
    assert not {"dp-merf", "dp-ntk", "dp-kernel", "gs-wgan", "pe"} & set(ADAPTING)
    for name in ("dp-merf", "dp-kernel", "gs-wgan", "pe"):  # own schedules: left as they are
        assert _resolved(name, 1797) == _resolved(name, None)


@pytest.mark.parametrize("n", [1797, 5000])
@pytest.mark.parametrize("name", ADAPTING)
def test_small_n_gets_a_low_sample_rate_enough_steps_and_no_more_compute(name, n):
    default = method_defaults(get_method(name))
    opts = _resolved(name, n)
    plan = DPSGDPlan(dataset_size=n, batch_size=opts.batch_size, epochs=opts.epochs)  # what the event will state
    assert opts.batch_size <= default["batch_size"] and plan.sample_rate <= 0.1
    assert plan.steps >= 180  # about 200 or more (epochs round to the nearest)
    assert opts.epochs * n <= default["epochs"] * 60_000  # never more images than the default at 60,000
    assert (opts.lr, opts.clip) == (default["lr"], default["clip"])
    assert {k for k, _, _ in opts.adapted} <= {"batch_size", "epochs"}


def test_the_numbers_at_1797_and_5000():
    table = {(name, n): (o.batch_size, o.epochs) for name in ("dpdm", "dp-cvae", "dp-gan") for n in (1797, 5000)
             for o in [_resolved(name, n)]}
    assert table == {("dpdm", 1797): (179, 20), ("dpdm", 5000): (500, 20),  # 200 steps at q = 0.1
                     ("dp-cvae", 1797): (179, 23), ("dp-cvae", 5000): (500, 23),  # 230: as its 234 at 60,000
                     ("dp-gan", 1797): (179, 23), ("dp-gan", 5000): (256, 12)}  # 256 <= 500: batch kept
    opts = _resolved("dpdm", 1797)
    assert opts.adapted == (("batch_size", 4096, 179), ("epochs", 2, 20))
    assert opts.notes[0].startswith("batch size 4096 -> 179 for N = 1,797 (`batch_size` not set")


def test_values_the_user_set_are_never_changed():
    only_batch = _resolved("dpdm", 1797, batch_size=1000)
    assert only_batch.batch_size == 1000 and [k for k, _, _ in only_batch.adapted] == ["epochs"]
    only_epochs = _resolved("dpdm", 1797, epochs=3)
    assert only_epochs.epochs == 3 and only_epochs.adapted == (("batch_size", 4096, 179),)
    both = _resolved("dp-cvae", 5000, batch_size=512, epochs=2)  # the defaults' own values, but given
    assert (both.batch_size, both.epochs, both.adapted, both.notes) == (512, 2, (), ())
    tiny = _resolved("dp-cvae", 20)  # the batch floor (32) never passes N
    assert tiny.batch_size == 20 and math.isclose(DPSGDPlan(20, 20, tiny.epochs).sample_rate, 1.0)


def test_finetune_on_sklearn_digits_records_the_adapted_batch_and_stays_within_eps(tmp_path, capsys):
    """dp-cvae on the 1,797 digits at 8x8, tiny generator; --epochs given (kept), batch adapted."""
    run = tmp_path / "run"
    code = main(["finetune", "--sensitive", "digits", "--resolution", "8", "--method", "dp-cvae", "--eps", "2",
                 "--epochs", "3", "--arch", "width=4,hidden=16,latent_dim=4", "--run", str(run), "--quiet", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = yaml.safe_load(out.strip().splitlines()[-1])
    manifest = yaml.safe_load((run / MANIFEST).read_text())
    config = manifest["stages"]["finetune"]["config"]
    assert manifest["sensitive"]["size"] == 1797
    assert (config["batch_size"], config["epochs"]) == (179, 3)  # adapted; the user's epochs kept
    assert config["adapted_to_size"] == {"dataset_size": 1797, "batch_size": {"default": 512, "used": 179}}
    assert config["option_notes"] == result["option_notes"] and "batch size 512 -> 179" in result["option_notes"][0]
    (event,) = manifest["privacy"]["events"]
    expected = DPSGDPlan(dataset_size=1797, batch_size=179, epochs=3)  # the event is planned on the final options
    assert (event["sample_rate"], event["steps"]) == (expected.sample_rate, expected.steps) == (0.1, 30)
    assert result["epsilon_spent"] <= 2.0 and manifest["privacy"]["epsilon"] <= 2.0
