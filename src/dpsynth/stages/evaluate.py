"""Stage `evaluate`: utility under DPImageBench's DP-safe protocol, and FID/KID on a named
feature network. Evaluation against the sensitive test set is reporting, not release."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..data import load_dataset
from ..errors import BadInput
from ..evaluation.fidelity import compute_fidelity, extract_features, inception_available, make_feature_network
from ..evaluation.fld import fld
from ..evaluation.manifold import precision_recall
from ..evaluation.utility import evaluate_utility
from ..rundir import RunDir
from .common import Progress, check_positive, load_sensitive, no_progress, settings_from_run, check_same_data
from .generate import STAGE as GENERATE_STAGE, SYNTHETIC
from .query_cache import query_net_for

STAGE = "evaluate"
RESULTS_CSV = "results.csv"
PROTOCOLS = ("dp-safe-selection", "test-set-selection")
DEFAULT_FEATURE_PUBLIC = "mnist5k"


def _feature_network(run: RunDir, feature_public: str | None, resolution: int, channels: int, seed: int):
    name = feature_public or (run.manifest.get("public") or {}).get("name") or DEFAULT_FEATURE_PUBLIC
    settings = settings_from_run(run)
    public = load_dataset(name, "train", root=settings.data_root, resolution=resolution, channels=channels)
    net, identity = query_net_for(public, seed=seed)

    class Features(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net.features(x)

    return make_feature_network(Features(), identity, input_channels=channels, resolution=resolution)


def run_evaluate(run_path: str | Path, *, protocol: str = "dp-safe-selection", classifier: str = "cnn",
                 epochs: int = 10, feature_public: str | None = None, fid_max_real: int = 10000,
                 compare_protocols: bool = False, progress: Progress = no_progress) -> dict:
    """Evaluate the run's synthetic set. With `compare_protocols`, the same classifier is also
    selected on the real test set (the flawed practice) to show how much that overstates accuracy."""
    if protocol not in PROTOCOLS:
        raise BadInput(f"--protocol {protocol!r} is unknown; choose one of {', '.join(PROTOCOLS)}")
    check_positive("--epochs", epochs, integer=True)
    check_positive("--fid-max-real", fid_max_real, integer=True)
    run = RunDir.open(run_path)
    run.require_stage(GENERATE_STAGE, STAGE)
    with np.load(io.BytesIO(run.read_artifact(SYNTHETIC))) as npz:
        fake_images, fake_labels = torch.from_numpy(npz["images"]), torch.from_numpy(npz["labels"]).long()
    settings = settings_from_run(run)
    sens = run.manifest["sensitive"]
    seed = settings.seed
    protocols = list(PROTOCOLS) if compare_protocols else [protocol]
    test_images, test_labels = _test_set(settings)  # read once; only reporting uses it

    utilities = {name: evaluate_utility(fake_images, fake_labels, test_images, test_labels, sens["num_classes"],
                                        protocol=name, classifier=classifier, epochs=epochs, seed=seed,
                                        progress=progress)
                 for name in protocols}
    fidelity = _fidelity(run, settings, fake_images, test_images, feature_public, fid_max_real, progress)
    per_protocol = {
        name: {
            "protocol": name,
            "dp_safe": name == "dp-safe-selection",
            "classifier": classifier,
            "accuracy": utility.accuracy,
            "selected_epoch": utility.selected_epoch,
            "val_accuracies": [round(a, 4) for a in utility.val_accuracies],
            **fidelity,
            "n_synthetic": int(len(fake_images)),
            "epsilon": run.manifest["privacy"]["epsilon"],
            "delta": run.delta,
        }
        for name, utility in utilities.items()
    }
    table = pd.DataFrame([{"run": run.manifest["run_id"], "method": run.manifest["method"], "sensitive": sens["name"],
                           **{k: v for k, v in row.items() if k != "val_accuracies"}}
                          for row in per_protocol.values()])
    with run.lock():
        run.begin_stage(STAGE, {"protocols": protocols, "classifier": classifier, "epochs": epochs,
                                "feature_network": fidelity["feature_network"]}, inputs=[SYNTHETIC])
        run.write_artifact(STAGE, RESULTS_CSV, table.to_csv(index=False).encode())
        run.manifest["results"].update(per_protocol)
        run.end_stage(STAGE)
    results = dict(per_protocol[protocol if not compare_protocols else "dp-safe-selection"])
    if compare_protocols:
        flawed = per_protocol["test-set-selection"]["accuracy"]
        results["test_set_selection_accuracy_NOT_DP"] = flawed
        results["overstatement"] = flawed - results["accuracy"]
    return results


def _fidelity(run, settings, fake_images, test_images, feature_public, fid_max_real, progress) -> dict:
    sens = run.manifest["sensitive"]
    features = _feature_network(run, feature_public, sens["resolution"], sens["channels"], settings.seed)
    real = load_sensitive(settings)
    check_same_data(run, real)
    if len(real) > fid_max_real:
        gen = torch.Generator().manual_seed(settings.seed)
        real = real.subset(torch.randperm(len(real), generator=gen)[:fid_max_real])
    fidelity = compute_fidelity(real.images, fake_images, features, progress=progress)
    extra = _manifold_metrics(real.images, fake_images, test_images, features, settings.seed, progress)
    return {
        "fid_domain": fidelity["fid"],
        "kid_domain": fidelity["kid"],
        "feature_network": fidelity["feature_network"],
        "fid_reference": f"{sens['name']} train ({fidelity['n_real']} images)",
        **extra,
        # Inception FID needs clean-fid's weights; a domain FID is never reported under that name.
        "fid_note": ("domain-feature FID/KID on the named network; not comparable to Inception FID"
                     + ("" if inception_available() else " (Inception weights not available on this machine)")),
    }


def _manifold_metrics(real, fake, real_test, features, seed, progress, max_pr: int = 5000,
                      max_fld: int = 2000) -> dict:
    """Precision/recall (k=4 manifolds, up to 5,000 per set) and FLD (its EM fit is quadratic:
    up to 2,000 per set) on the same named feature network."""
    gen = torch.Generator().manual_seed(seed)

    def capped(images, n):
        return images if len(images) <= n else images[torch.randperm(len(images), generator=gen)[:n]]

    feats = {name: extract_features(capped(images, max_pr), features, progress=progress, phase=f"features-{name}")
             for name, images in (("real", real), ("fake", fake), ("real-test", real_test))}
    pr = precision_recall(feats["real"], feats["fake"], k=4)
    small = {name: f[:max_fld] for name, f in feats.items()}  # already shuffled above
    return {"precision_domain": pr["precision"], "recall_domain": pr["recall"],
            "fld_domain": fld(small["real"], small["real-test"], small["fake"], seed=seed),
            "fld_samples": min(max_fld, *(len(f) for f in feats.values()))}


def _test_set(settings):
    test = load_sensitive(replace(settings, limit=None), split="test")
    return test.images, test.labels
