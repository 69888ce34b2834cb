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
                 progress: Progress = no_progress) -> dict:
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

    utility = evaluate_utility(fake_images, fake_labels, *_test_set(settings), sens["num_classes"],
                               protocol=protocol, classifier=classifier, epochs=epochs, seed=seed,
                               progress=progress)
    features = _feature_network(run, feature_public, sens["resolution"], sens["channels"], seed)
    real = load_sensitive(settings)
    check_same_data(run, real)
    if len(real) > fid_max_real:
        real = real.subset(torch.randperm(len(real), generator=torch.Generator().manual_seed(seed))[:fid_max_real])
    fidelity = compute_fidelity(real.images, fake_images, features, progress=progress)
    extra = _manifold_metrics(real.images, fake_images, _test_set(settings)[0], features, seed, progress)

    results = {
        "protocol": protocol,
        "dp_safe": protocol == "dp-safe-selection",
        "classifier": classifier,
        "accuracy": utility.accuracy,
        "selected_epoch": utility.selected_epoch,
        "val_accuracies": [round(a, 4) for a in utility.val_accuracies],
        "fid_domain": fidelity["fid"],
        "kid_domain": fidelity["kid"],
        "feature_network": fidelity["feature_network"],
        "fid_reference": f"{sens['name']} train ({fidelity['n_real']} images)",
        **extra,
        # Inception FID needs clean-fid's weights; this stage never reports a domain FID under that name.
        "fid_note": ("domain-feature FID/KID on the named network; not comparable to Inception FID"
                     + ("" if inception_available() else " (Inception weights not available on this machine)")),
        "n_synthetic": int(len(fake_images)),
        "epsilon": run.manifest["privacy"]["epsilon"],
        "delta": run.delta,
    }
    table = pd.DataFrame([{"run": run.manifest["run_id"], "method": run.manifest["method"],
                           "sensitive": sens["name"], **{k: v for k, v in results.items() if k != "val_accuracies"}}])
    with run.lock():
        run.begin_stage(STAGE, {"protocol": protocol, "classifier": classifier, "epochs": epochs,
                                "feature_network": fidelity["feature_network"]}, inputs=[SYNTHETIC])
        run.write_artifact(STAGE, RESULTS_CSV, table.to_csv(index=False).encode())
        run.manifest["results"][protocol] = results
        run.end_stage(STAGE)
    return results


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
