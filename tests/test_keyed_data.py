"""Issue 11 items 1, 3, 4: nothing in a run directory is an unkeyed function of the sensitive set,
--limit and --holdout are 1-stable, and --public-size replaces the true N."""

from __future__ import annotations

import math
import os
import stat

import numpy as np
import pytest
import torch
import yaml

from dpsynth.cli.main import main
from dpsynth.data import ImageSet, content_digest, load_dataset
from dpsynth.data.keyed import keyed_members, keyed_tag
from dpsynth.errors import BadInput
from dpsynth.privacy.owner_key import KEY_FILE, load_owner_key
from dpsynth.pipeline.common import DataSettings, load_sensitive, open_or_create_run

from cli_helpers import snapshot


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh owner home per test: the key is created on first use."""
    path = tmp_path / "home"
    monkeypatch.setenv("DPSYNTH_HOME", str(path))
    return path


def _npz(path, images: torch.Tensor, labels: torch.Tensor) -> str:
    np.savez(path, images=images.numpy(), labels=labels.numpy())
    return f"npz:{path}"


def _digits_plus_one(tmp_path):
    """Two neighbouring datasets: the digits, and the digits with one image added (in the middle)."""
    base = load_dataset("digits")
    extra = torch.full((1, *base.images.shape[1:]), 7, dtype=torch.uint8)
    at = len(base) // 2
    images = torch.cat([base.images[:at], extra, base.images[at:]])
    labels = torch.cat([base.labels[:at], torch.tensor([3]), base.labels[at:]])
    small = _npz(tmp_path / "d.npz", base.images, base.labels)
    big = _npz(tmp_path / "d_plus.npz", images, labels)
    return small, big


def _rows(images: ImageSet) -> set[bytes]:
    return {img.numpy().tobytes() + bytes([int(y)]) for img, y in zip(images.images, images.labels)}


def _manifest(run_path, settings: DataSettings) -> dict:
    run, _ = open_or_create_run(run_path, method="dp-merf", settings=settings, delta=None)
    with run.lock():
        run.save()
    return yaml.safe_load((run_path / "manifest.yaml").read_text())


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ---------------------------------------------------------------------------------- the key

def test_key_is_created_owner_only_and_refused_when_others_can_read_it(home):
    key = load_owner_key()
    path = home / KEY_FILE
    assert key.path == path and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_owner_key().secret == key.secret  # created once, then read
    assert key.secret.hex() not in repr(key)
    os.chmod(path, 0o644)
    with pytest.raises(BadInput, match=r"mode 0644.*chmod 600"):
        load_owner_key()
    os.chmod(path, 0o600)
    path.write_text("not hex\n")
    with pytest.raises(BadInput, match="malformed"):
        load_owner_key()


def test_a_bad_key_file_is_one_line_exit_2_and_changes_nothing(home, tmp_path, capsys):
    load_owner_key()
    os.chmod(home / KEY_FILE, 0o640)
    before = snapshot(tmp_path)
    code = main(["finetune", "--run", str(tmp_path / "run"), "--method", "dp-merf", "--sensitive", "digits",
                 "--eps", "1", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "chmod 600" in err and "Traceback" not in err, err
    assert snapshot(tmp_path) == before


def test_two_owners_keys_give_two_tags_for_the_same_data(tmp_path, monkeypatch):
    data = load_dataset("digits")
    tags = []
    for owner in ("alice", "bob"):
        monkeypatch.setenv("DPSYNTH_HOME", str(tmp_path / owner))
        tags.append(keyed_tag(data, load_owner_key()))
        assert tags[-1] == keyed_tag(data, load_owner_key())  # stable under one key
    assert tags[0] != tags[1]
    assert content_digest(data).split(":")[1] not in tags


def test_neighbouring_datasets_give_manifests_that_differ_only_in_keyed_and_declared_fields(home, tmp_path):
    small, big = _digits_plus_one(tmp_path)
    key = load_owner_key()
    manifests = []
    for name, spec in (("a", small), ("b", big)):
        settings = DataSettings(sensitive=spec, public=None, limit=1000, holdout=0.2, public_size=2000)
        manifests.append(_manifest(tmp_path / name, settings))
        text = (tmp_path / name / "manifest.yaml").read_text()
        full = load_dataset(spec)
        # No unkeyed digest of the data (or of the subset actually trained on) is in the run directory.
        for images in (full, load_sensitive(settings)):
            assert content_digest(images).split(":")[1] not in text
    a, b = (_flat(m) for m in manifests)
    differ = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
    # With --public-size, the size and delta are declared, so the only data-dependent values are keyed tags.
    assert differ <= {"sensitive.tag", "holdout.tag", "holdout.size", "settings.sensitive", "sensitive.name",
                      "sensitive.source", "run_id", "created"}, differ
    # (the tags differ only when the added image falls in the kept part; otherwise the parts are identical)
    assert a["sensitive.size"] == b["sensitive.size"] == 800 and a["privacy.delta"] == b["privacy.delta"]
    assert a["sensitive.key_id"] == key.key_id
    assumptions = manifests[0]["privacy"]["assumptions"]
    assert "add/remove" in assumptions["adjacency"] and "public_size" in assumptions["dataset_size"]


def test_without_public_size_the_manifest_says_the_true_size_is_released(home, tmp_path):
    manifest = _manifest(tmp_path / "run", DataSettings(sensitive="digits", public=None))
    assert manifest["sensitive"]["size"] == 1797
    assert "true size" in manifest["privacy"]["assumptions"]["dataset_size"]
    assert manifest["privacy"]["delta"] == pytest.approx(1 / (1797 * math.log(1797)))


def test_a_legacy_plain_fingerprint_is_checked_and_replaced_by_the_keyed_tag(home, tmp_path, capsys):
    run_path = tmp_path / "run"
    settings = DataSettings(sensitive="digits", public=None, resolution=8)
    manifest = _manifest(run_path, settings)
    legacy = content_digest(load_sensitive(settings))
    del manifest["sensitive"]["tag"], manifest["sensitive"]["key_id"]
    manifest["sensitive"]["fingerprint"] = legacy
    (run_path / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    code = main(["finetune", "--run", str(run_path), "--eps", "2", "--epochs", "1", "--batch-size", "200",
                 "--train-opts", "features=16", "--arch", "width=4,hidden=16,latent_dim=8", "--quiet"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert err.count("note: ") == 1 and "keyed tag" in err, err
    text = (run_path / "manifest.yaml").read_text()
    assert legacy not in text and "fingerprint" not in text
    assert yaml.safe_load(text)["sensitive"]["tag"] == keyed_tag(load_sensitive(settings), load_owner_key())


# ---------------------------------------------------------------------------------- 1-stable membership

@pytest.mark.parametrize("purpose,fraction", [("limit", 0.3), ("holdout", 0.1)])
def test_membership_of_other_images_does_not_move_when_one_image_is_added(home, tmp_path, purpose, fraction):
    small, big = _digits_plus_one(tmp_path)
    key = load_owner_key()
    a, b = load_dataset(small), load_dataset(big)
    in_a = keyed_members(a, key, fraction, purpose, seed=0)
    in_b = keyed_members(b, key, fraction, purpose, seed=0)
    at = len(a) // 2
    assert torch.equal(in_a, torch.cat([in_b[:at], in_b[at + 1:]]))  # every common image: same decision
    assert abs(float(in_a.float().mean()) - fraction) < 0.05
    assert not torch.equal(in_a, keyed_members(a, key, fraction, purpose, seed=1))  # the seed matters


def test_training_part_changes_by_at_most_the_added_image(home, tmp_path):
    small, big = _digits_plus_one(tmp_path)
    parts = [load_sensitive(DataSettings(sensitive=spec, public=None, limit=900, holdout=0.25, public_size=1797))
             for spec in (small, big)]
    rows_a, rows_b = (_rows(p) for p in parts)
    added = {torch.full((1, 8, 8), 7, dtype=torch.uint8).numpy().tobytes() + bytes([3])}
    assert rows_b - rows_a <= added and not rows_a - rows_b


# ---------------------------------------------------------------------------------- --public-size

def test_public_size_sets_sample_rate_steps_and_delta(home, tmp_path):
    run = tmp_path / "run"
    code = main(["finetune", "--run", str(run), "--method", "dp-cvae", "--sensitive", "digits", "--public-size",
                 "60000", "--resolution", "8", "--eps", "8", "--epochs", "1", "--batch-size", "6000",
                 "--arch", "width=4,hidden=16,latent_dim=8", "--quiet"])
    assert code == 0
    manifest = yaml.safe_load((run / "manifest.yaml").read_text())
    (event,) = manifest["privacy"]["events"]
    assert event["sample_rate"] == pytest.approx(6000 / 60000) and event["steps"] == 10
    assert manifest["privacy"]["delta"] == pytest.approx(1 / (60000 * math.log(60000)))
    assert manifest["sensitive"]["size"] == 60000
    assert "1797" not in (run / "manifest.yaml").read_text()  # the true size is written nowhere


def test_public_size_is_fixed_at_creation_and_validated(home, tmp_path, capsys):
    for value, expected in (("2", "--public-size 2"), ("abc", "--public-size abc is not allowed")):
        code = main(["finetune", "--run", str(tmp_path / "r"), "--sensitive", "digits", "--eps", "1",
                     "--public-size", value])
        err = capsys.readouterr().err
        assert code == 2 and expected in err and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()
