"""Stage `evaluate`: utility under DPImageBench's protocols and fidelity on a named feature network.

Evaluation against the sensitive test set is reporting, not release. Test accuracy needs a test
set disjoint from the training set: named sets keep their official test split, `npz:` and
`imagefolder:` runs need `--sensitive-test` (else accuracy is refused, never measured on the
training images). The one selection
that reads sensitive data the generator never saw, noisy-val, is a ledger event: it is
either reserved at run creation (`--noisy-val-eps`) or charged here, and a charge that
would take the run past its target epsilon is refused before anything is written. DPImageBench's own
selection (dpimagebench-val: un-noised accuracy on that hold-out) is offered only as a named
comparison with its published tables, marked NOT DP in every row it produces.
"""

from __future__ import annotations

import functools
import io
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..data import load_dataset
from ..data.common import has_disjoint_test
from ..data.registry import data_root
from ..errors import BadInput, BudgetExhausted
from ..evaluation.feature_cache import FeatureCache
from ..evaluation.fidelity import (INCEPTION, extract_features, extract_probabilities, fid_from_features,
                                   find_inception_weights, inception_network, kid_from_features,
                                   make_feature_network)
from ..evaluation.fld import fld
from ..evaluation.inception_score import inception_score
from ..evaluation.manifold import precision_recall
from ..evaluation.selection import (DP_SAFE, DPIMAGEBENCH_VAL, HOLDOUT_PROTOCOLS, NOISY_VAL, PROTOCOLS, TEST_SET,
                                    check_protocol)
from ..mechanisms.noisy_val import RESERVED, charge_event, check_noise, noise_rng, noisy_val_scale
from ..evaluation.results import NoisyVal
from ..evaluation.utility import CLASSIFIER_GROUPS, evaluate_protocols, parse_classifiers
from ..privacy.accountant import compose_epsilon, epsilon_upper
from ..privacy.refusal import Shortfall, budget_refusal, round_down
from ..privacy.events import event_from_dict
from .rundir import RunDir, now
from ..validation import check_positive
from .common import (Progress, cache_dir, check_same_data, load_holdout, load_sensitive,
                     no_progress, settings_from_run)
from .lifecycle import stage_run
from .names import EVALUATE as STAGE, GENERATE as GENERATE_STAGE, RESULTS_CSV, SYNTHETIC
from .query_cache import query_net_for
from .sensitive_test import describe as describe_test, load_sensitive_test, no_test_set
from ..training.device import resolve_device

DEFAULT_FEATURE_PUBLIC = "mnist5k"
FIDELITY_ONLY = "fidelity-only"  # results key of an evaluation that trains no classifier
IMAGE_REWARD_UNAVAILABLE = ("unavailable: ImageReward needs its reward model (ImageReward-v1.0) and BLIP/BERT "
                            "weights from Hugging Face, which this offline machine cannot fetch; it also scores "
                            "text-image alignment, so it needs a prompt per class")
ACCURACY_NOTE = ("accuracy = mean over the classifiers of their real-test accuracy (as DPImageBench's tables "
                 "combine them); accuracy_best = the best one; each classifier's checkpoint is chosen by the "
                 "protocol")
DPIMAGEBENCH_NOTE = ("NOT DP: checkpoints chosen by UN-noised accuracy on the run's sensitive hold-out, as "
                     "DPImageBench's evaluator does for its published tables (eval.mode=val, 5,000 images there); "
                     "a comparison with those tables, never a DP result")


def run_evaluate(run_path: str | Path, *, protocol: str = DP_SAFE, classifier: str = "cnn", epochs: int = 10,
                 feature_public: str | None = None, fid_max_real: int = 10000, compare_protocols: bool = False,
                 val_eps: float | None = None, val_noise: str = "laplace", inception_weights: str | None = None,
                 batch_size: int = 256, sensitive_test: str | None = None, fidelity_only: bool = False,
                 device: str | None = None, progress: Progress = no_progress) -> dict:
    """Evaluate the run's synthetic set on `device` (auto: the GPU when one is visible): classifier
    training and feature extraction run there. With `compare_protocols`, the same classifiers are also
    selected on the sensitive hold-out (noisy-val, when the run has one) and on the real test set
    (the flawed practice) to show how much the latter overstates accuracy. `sensitive_test`
    (default: the one recorded at creation, else the official test split) is the test set;
    `fidelity_only` skips the classifiers (then no test set is needed)."""
    check_protocol(protocol)
    if fidelity_only and (compare_protocols or protocol != DP_SAFE or val_eps is not None):
        raise BadInput("`fidelity_only` trains no classifier; it takes no `protocol`, `compare_protocols` or "
                       "`val_eps`")
    check_positive("epochs", epochs, integer=True)
    check_positive("fid_max_real", fid_max_real, integer=True)
    check_positive("batch_size", batch_size, integer=True)
    check_noise(val_noise)
    if val_eps is not None:
        check_positive("val_eps", val_eps)
    classifiers = parse_classifiers(classifier)
    torch_device = resolve_device(device)
    run = RunDir.open(run_path)
    run.require_stage(GENERATE_STAGE, STAGE)
    with np.load(io.BytesIO(run.read_artifact(SYNTHETIC))) as npz:
        fake_images, fake_labels = torch.from_numpy(npz["images"]), torch.from_numpy(npz["labels"]).long()
    settings = settings_from_run(run)
    sens = run.manifest["sensitive"]
    test_spec = sensitive_test or settings.sensitive_test
    has_test = test_spec is not None or has_disjoint_test(settings.sensitive)
    if not has_test and not fidelity_only:
        raise BadInput(no_test_set(settings.sensitive))  # never a "test accuracy" on the training images

    protocols = [] if fidelity_only else list(PROTOCOLS) if compare_protocols else [protocol]
    unavailable = {}
    for needs_holdout in [p for p in protocols if p in HOLDOUT_PROTOCOLS]:
        if (run.manifest.get("holdout") or {}).get("size"):
            break
        reason = (f"run {run.path} has no sensitive hold-out; {needs_holdout} needs one: create the run with "
                  f"`holdout` FRACTION (e.g. `holdout` 0.0833 holds out 5,000 of 60,000, as DPImageBench does)")
        if not compare_protocols:
            raise BadInput(reason)
        protocols.remove(needs_holdout)
        unavailable[needs_holdout] = "unavailable: " + reason
    # Privacy first: the noisy-val event is decided and checked before anything is computed or written.
    plan = None
    if NOISY_VAL in protocols:
        try:
            plan = _plan_noisy_val(run, len(classifiers) * epochs, val_eps, val_noise)
        except BudgetExhausted as exc:
            if not compare_protocols:
                raise
            protocols.remove(NOISY_VAL)  # a comparison still runs the two protocols that cost nothing
            unavailable[NOISY_VAL] = f"unavailable: {exc.one_line}"
    real = load_sensitive(settings)  # the training set, for fidelity; checked before anything is written
    check_same_data(run, real)
    # A user-given test set is checked against the training set now, so a mismatch writes nothing; it is
    # held here and handed to the classifiers only through load_test, after selection, like a named one.
    given_test = load_sensitive_test(test_spec, settings, real) if test_spec else None
    features = feature_network(run, settings, feature_public, inception_weights, torch_device)
    holdout = load_holdout(run) if plan or DPIMAGEBENCH_VAL in protocols else None

    test_cache: dict = {}

    def load_test():  # the sensitive test set, loaded at most once and only when first needed
        if not test_cache:
            test = given_test if given_test is not None else load_sensitive(replace(settings, limit=None),
                                                                            split="test")
            test_cache["set"] = test
            test_cache["data"] = (test.images, test.labels)
        return test_cache["data"]

    config = {"protocols": protocols or [FIDELITY_ONLY], "classifiers": [] if fidelity_only else classifiers,
              "epochs": epochs, "batch_size": batch_size, "feature_network": features.name,
              "val_noise": plan["noise"] if plan else None, "sensitive_test": test_spec,
              "device": str(torch_device)}
    with stage_run(run, STAGE, config, inputs=[SYNTHETIC]):
        noisy = _charge(run, plan, holdout) if plan else None  # write-ahead: before any noisy count exists
        utilities = {} if fidelity_only else evaluate_protocols(
            fake_images, fake_labels, load_test, sens["num_classes"], protocols=protocols,
            classifiers=classifiers, noisy_val=noisy, epochs=epochs, batch_size=batch_size, seed=settings.seed,
            sensitive_val=(holdout.images, holdout.labels) if DPIMAGEBENCH_VAL in protocols else None,
            device=torch_device, progress=progress)
        fidelity = _fidelity(run, settings, real, fake_images, load_test()[0] if has_test else None, features,
                             fid_max_real, batch_size, progress, torch_device)
        fidelity["test_set"] = describe_test(test_spec, settings.sensitive, test_cache.get("set"))
        if fidelity_only:
            per_protocol = {FIDELITY_ONLY: _fidelity_row(run, fidelity, len(fake_images))}
        else:
            per_protocol = {name: _result_row(run, utility, fidelity, plan, len(fake_images))
                            for name, utility in utilities.items()}
        table = pd.DataFrame([{"run": run.manifest["run_id"], "method": run.manifest["method"],
                               "sensitive": sens["name"], **_flat(row)} for row in per_protocol.values()])
        run.write_artifact(STAGE, RESULTS_CSV, table.to_csv(index=False).encode())
        run.manifest["results"].update(per_protocol)
    if fidelity_only:
        return {k: v for k, v in per_protocol[FIDELITY_ONLY].items() if k != "per_classifier"}
    return _summary(per_protocol, protocol, compare_protocols, unavailable)


# ---- noisy-val privacy ------------------------------------------------------------------------
def _reservation(run: RunDir):
    """The unused noisy-val event reserved when the run was created, or None."""
    if (run.manifest.get("holdout") or {}).get("reservation_used"):
        return None
    for record in run.manifest["privacy"]["events"]:
        if record.get("stage") == STAGE and RESERVED in str(record.get("note", "")):
            return event_from_dict(record)
    return None


def _plan_noisy_val(run: RunDir, num_counts: int, val_eps: float | None, noise: str) -> dict:
    """Which event pays for the `num_counts` noisy hold-out counts, and their per-count noise scale."""
    reserved = _reservation(run) if val_eps is None else None
    if reserved is not None:
        return {"event": reserved, "new": False, "noise": "gaussian", "scale": noisy_val_scale(reserved, num_counts),
                "num_counts": num_counts, "epsilon_after": run.manifest["privacy"]["epsilon"]}
    target = run.manifest["privacy"].get("target_epsilon")
    spent = run.events()
    if val_eps is None:
        room = _largest_val_eps(run, spent, target, num_counts, noise)
        raise budget_refusal(
            Shortfall(stage=STAGE, target=float(target) if target is not None else 0.0, delta=run.delta,
                      spent=tuple(spent), planned=(), what="noisy-val", param=None),
            [f"pass `val_eps` {room:g} or less: the most that fits the run's target ε={target:g}" if room else None,
             *_noisy_val_alternatives()],
            headline=f"noisy-val needs privacy budget, and this run reserved none (or used it): it has spent "
                     f"ε={epsilon_upper(spent, run.delta):.3f} of "
                     + (f"its target ε={target:g}" if target is not None else "no target yet (finetune sets it)")
                     + f" (δ={run.delta:.3g})")
    event = charge_event(val_eps, noise, num_counts, spent, run.delta)
    after = compose_epsilon([*spent, event], run.delta)
    if target is None or after.upper > float(target):
        room = _largest_val_eps(run, spent, target, num_counts, noise)
        what = f"its {num_counts} noisy-val counts ({noise}, `val_eps` {val_eps:g})"
        shortfall = Shortfall(stage=STAGE, target=float(target) if target is not None else 0.0, delta=run.delta,
                              spent=tuple(spent), planned=(event,), what=what, param=None)
        raise budget_refusal(shortfall, [
            f"in this run: `val_eps` {room:g} or less (the most that fits)" if room else None,
            *_noisy_val_alternatives()],
            headline=None if target is not None else
            f"{STAGE} cannot charge {what}: the run has no target ε yet (finetune sets it)")
    return {"event": event, "new": True, "noise": noise, "scale": noisy_val_scale(event, num_counts),
            "num_counts": num_counts, "after": after, "epsilon_after": after.upper}


def _noisy_val_alternatives() -> list[str]:
    return ["or, in a new `run` directory, reserve it at creation (`holdout` 0.1 `noisy_val_eps` EPS): "
            "finetune's calibration then leaves room for it",
            "or use `protocol` dp-safe-selection, which costs nothing"]


def _largest_val_eps(run: RunDir, spent: list, target, num_counts: int, noise: str) -> float | None:
    """The largest `val_eps` (2 significant digits) whose event keeps the ledger within the run's target."""
    if target is None:
        return None
    room = round_down(float(target) - epsilon_upper(spent, run.delta))
    for _ in range(8):  # Gaussian fits at once (its calibration caps the rise); Laplace is checked
        if room <= 0:
            return None
        try:
            if epsilon_upper([*spent, charge_event(room, noise, num_counts, spent, run.delta)], run.delta) <= target:
                return room
        except BudgetExhausted:
            pass
        room = round_down(room * 0.8)
    return None


def _charge(run: RunDir, plan: dict, holdout) -> NoisyVal:
    """Record the event (or mark the reservation used) on disk, then hand out the noisy-count mechanism."""
    if plan["new"]:
        run.record_event(plan["event"], plan["after"])
    else:
        run.manifest["holdout"]["reservation_used"] = now()
        run.save()
    return NoisyVal(images=holdout.images, labels=holdout.labels, noise=plan["noise"], scale=plan["scale"],
                    rng=noise_rng())


# ---- fidelity ---------------------------------------------------------------------------------
def feature_network(run: RunDir, settings, feature_public: str | None, inception_weights: str | None,
                    device: torch.device):
    """Inception-v3 when its weights are on disk (or given), else the public-only domain network."""
    path = find_inception_weights(inception_weights, search=(cache_dir(),))
    if path is not None:
        return inception_network(path, device)
    sens = run.manifest["sensitive"]
    name = feature_public or (run.manifest.get("public") or {}).get("name") or DEFAULT_FEATURE_PUBLIC
    public = _public_set(name, settings.data_root, sens["resolution"], sens["channels"])
    net, identity = query_net_for(public, seed=settings.seed)

    class Features(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net.features(x)

    return make_feature_network(Features(), identity, input_channels=sens["channels"],
                                resolution=sens["resolution"], device=device, classifier=net)


@functools.lru_cache(maxsize=2)
def _public_set(name: str, root: str | None, resolution: int, channels: int):
    # Public data only, immutable: repeated evaluations in one process parse it once.
    return load_dataset(name, "train", root=root, resolution=resolution, channels=channels)


def feature_cache_dir(settings) -> Path:
    """Next to the sensitive data (features of sensitive images are sensitive), never in the run."""
    return Path(os.environ.get("DPSYNTH_FEATURE_CACHE") or data_root(settings.data_root) / "features")


def _fidelity(run, settings, real, fake_images, test_images, features, fid_max_real, batch_size, progress, device,
              max_pr: int = 5000, max_fld: int = 2000) -> dict:
    """FID/KID (up to fid_max_real real images), precision/recall (k=4, up to 5,000 per set), FLD (its EM
    fit is quadratic: up to 2,000 per set) and IS, all on one named network, against the sensitive train set
    `real`. FLD also needs the test set; without one (`test_images` None) it is not computed."""
    gen = torch.Generator().manual_seed(settings.seed)

    def capped(images, n):
        return images if len(images) <= n else images[torch.randperm(len(images), generator=gen)[:n]]

    cache = FeatureCache(feature_cache_dir(settings))

    def feats(images, phase):
        return cache.get(images, features, "features", lambda: extract_features(
            images, features, device=device, batch_size=batch_size, progress=progress, phase=phase))

    real_images = capped(real.images, fid_max_real)
    f_real, f_fake = feats(real_images, "features-real"), feats(fake_images, "features-fake")
    pr_real, pr_fake = capped(torch.from_numpy(f_real), max_pr), capped(torch.from_numpy(f_fake), max_pr)
    pr = precision_recall(pr_real, pr_fake, k=4)
    fld_value, fld_samples = None, 0
    if test_images is not None:  # FLD's generalisation term scores held-out real images
        f_test = feats(capped(test_images, max_pr), "features-real-test")
        fld_value = fld(pr_real[:max_fld], torch.from_numpy(f_test)[:max_fld], pr_fake[:max_fld],
                        seed=settings.seed)
        fld_samples = int(min(max_fld, len(pr_real), len(pr_fake), len(f_test)))
    probs = cache.get(fake_images, features, "probabilities", lambda: extract_probabilities(
        fake_images, features, device=device, batch_size=batch_size, progress=progress,
        phase="class-probabilities-fake"))
    is_mean, is_std = inception_score(probs, splits=min(10, len(probs)))
    nearer = _public_nearer(run, settings, f_real, f_fake, features, feats, capped)
    suffix = "_inception" if features.kind == INCEPTION else "_domain"
    note = ("Inception-v3 features (clean-fid weights)" if features.kind == INCEPTION else
            "domain-feature metrics on the named network (trained on public data only); not comparable to "
            "Inception FID/IS: no Inception weights on this machine (pass `inception_weights` PATH)")
    return {
        **{name + suffix: value for name, value in (
            ("fid", fid_from_features(f_real, f_fake)), ("kid", kid_from_features(f_real, f_fake, settings.seed)),
            ("precision", pr["precision"]), ("recall", pr["recall"]), ("fld", fld_value),
            ("is", is_mean), ("is_std", is_std))},
        "feature_network": features.name,
        "feature_kind": features.kind,
        # Under --public-size the true N is secret: counts that can equal it are not written.
        "fid_reference": f"sensitive training set: {run.manifest['sensitive']['name']} "
                         f"({f'up to {fid_max_real}' if settings.public_size else len(f_real)} images "
                         f"the generator was trained on)",
        "fld_samples": fld_samples if not settings.public_size or fld_samples == max_fld else None,
        "image_reward": None,
        "image_reward_note": IMAGE_REWARD_UNAVAILABLE,
        "fid_note": note,
        **nearer,
        "feature_cache": {"hits": cache.hits, "misses": cache.misses},
    }


def public_nearer_warning(result: dict) -> str | None:
    """The one-line warning of a result whose synthetic set is nearer the public set; None otherwise."""
    return result.get("warning") if result.get("public_nearer") else None


def _public_nearer(run, settings, f_real, f_fake, features, feats, capped) -> dict:
    """Is the synthetic set nearer the public set than the sensitive one? A generator that never left
    its public pretraining (or a DP step too noisy to move it) hands back pictures of the public set.

    FID on the evaluation's own network, from the synthetic set to n sensitive training images (the
    images FID already uses, subsampled) and to n public images (the whole public train split, not only
    a selected subset), with n the smaller of the two sets, so the two distances have the same
    sample-size bias. The sensitive side is the same reporting figure as the fidelity metrics (see
    NOT_ACCOUNTED); n is not written, since it may be the true size of the sensitive set. Not run
    (public_nearer None) when the run has no public set."""
    name = (run.manifest.get("public") or {}).get("name")
    if not name:
        return {"public_nearer": None, "nearer_check": "not run: the run has no public set"}
    sens = run.manifest["sensitive"]
    public = _public_set(name, settings.data_root, sens["resolution"], sens["channels"])
    n = min(len(f_real), len(public))
    if n < 2:
        return {"public_nearer": None, "nearer_check": f"not run: fewer than 2 images in {name} or the sensitive set"}
    f_public = feats(capped(public.images, n), "features-public")
    f_sensitive = capped(torch.from_numpy(f_real), n).numpy()
    to_sensitive, to_public = fid_from_features(f_sensitive, f_fake), fid_from_features(f_public, f_fake)
    nearer = bool(to_public < to_sensitive)
    check = (f"FID on {features.name} of the synthetic set to the sensitive training images FID uses "
             f"({sens['name']}, at most the public set's size) and to as many public images ({name})")
    row = {"public_nearer": nearer, "nearer_fid_sensitive": to_sensitive, "nearer_fid_public": to_public,
           "nearer_check": check}
    if nearer:
        row["warning"] = (f"the synthetic set is nearer the public set {name} (FID {to_public:.4g}) than the "
                          f"sensitive set {sens['name']} (FID {to_sensitive:.4g}) on {features.name}: the "
                          f"generator may be reproducing the public domain; look at samples.png")
    return row


# ---- results ----------------------------------------------------------------------------------
def _fidelity_row(run, fidelity, n_synthetic) -> dict:
    """A --fidelity-only result: no classifier, so no accuracy and no checkpoint selection."""
    return {"protocol": FIDELITY_ONLY, "dp_safe": True, "classifier": None, "accuracy": None,
            "accuracy_note": "not measured (fidelity only)", "per_classifier": {},
            **{k: v for k, v in fidelity.items() if k != "feature_cache"},
            "n_synthetic": int(n_synthetic), "epsilon": run.manifest["privacy"]["epsilon"], "delta": run.delta}


def _result_row(run, utility, fidelity, plan, n_synthetic) -> dict:
    result = utility.to_dict()
    row = {
        "protocol": utility.protocol,
        "dp_safe": utility.dp_safe,
        "classifier": ",".join(result["classifiers"]),
        "accuracy": result["accuracy_mean"],
        "accuracy_best": result["accuracy_best"],
        "best_classifier": result["best_classifier"],
        "accuracy_mean": result["accuracy_mean"],
        "accuracy_note": ACCURACY_NOTE,
        "selected_epoch": {c: v["selected_epoch"] for c, v in result["per_classifier"].items()},
        "per_classifier": result["per_classifier"],
        "train_size": result["train_size"], "val_size": result["val_size"],
        "epochs": result["epochs"],
        "epoch_note": f"selected_epoch is 1-based: 1 = the checkpoint after the first of {result['epochs']} epochs",
        **{k: v for k, v in fidelity.items() if k != "feature_cache"},
        "n_synthetic": int(n_synthetic),
        "epsilon": run.manifest["privacy"]["epsilon"],
        "delta": run.delta,
    }
    if utility.protocol == NOISY_VAL:
        row.update(holdout_size=result["holdout_size"], val_noise=plan["noise"], val_noise_scale=plan["scale"],
                   val_counts_released=plan["num_counts"],
                   val_event="reserved at run creation" if not plan["new"] else "charged by this evaluation")
    if utility.protocol == TEST_SET:
        row["not_dp"] = "NOT DP: checkpoints chosen by accuracy on the sensitive test set (shown only to measure " \
                        "how much that overstates accuracy)"
    if utility.protocol == DPIMAGEBENCH_VAL:
        three = CLASSIFIER_GROUPS["dpimagebench"]
        row.update(not_dp=DPIMAGEBENCH_NOTE, holdout_size=result["holdout_size"],
                   dpimagebench_classifiers=sorted(result["classifiers"]) == sorted(three))
    return row


def _flat(row: dict) -> dict:
    """A results.csv row: nested values become per-classifier columns."""
    flat = {k: v for k, v in row.items() if not isinstance(v, dict)}
    for name, values in row["per_classifier"].items():
        flat[f"accuracy_{name}"] = values["accuracy"]
        flat[f"selected_epoch_{name}"] = values["selected_epoch"]
    return flat


def _summary(per_protocol: dict, protocol: str, compare: bool, unavailable: dict) -> dict:
    primary = DP_SAFE if compare else protocol
    results = {k: v for k, v in per_protocol[primary].items() if k not in ("per_classifier",)}
    for name, values in per_protocol[primary]["per_classifier"].items():
        results[f"accuracy_{name}"] = values["accuracy"]
    if compare:
        flawed = per_protocol[TEST_SET]["accuracy"]
        results["test_set_selection_accuracy_NOT_DP"] = flawed
        results["overstatement"] = flawed - results["accuracy"]
        if NOISY_VAL in per_protocol:
            results["noisy_val_accuracy"] = per_protocol[NOISY_VAL]["accuracy"]
            results["overstatement_vs_noisy_val"] = flawed - per_protocol[NOISY_VAL]["accuracy"]
        if DPIMAGEBENCH_VAL in per_protocol:
            results["dpimagebench_val_accuracy_NOT_DP"] = per_protocol[DPIMAGEBENCH_VAL]["accuracy"]
        results.update({f"{name}": reason for name, reason in unavailable.items()})
        results["epsilon"] = max(row["epsilon"] for row in per_protocol.values())
    return results
