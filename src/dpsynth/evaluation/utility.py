"""Downstream utility: train classifiers on synthetic data, test them on real data.

Four checkpoint-selection protocols (rules in `selection`): DP-safe selection on a
synthetic validation split, noisy-val on a sensitive hold-out with ledger-charged
noise, the flawed test-set selection (never DP), and DPImageBench's own rule (un-noised
accuracy on the sensitive hold-out; never DP, a named comparison with its tables). `evaluate_protocols` trains each
classifier ONCE on the synthetic-train split and applies every requested rule to that
one trajectory, so a comparison measures the selection rule alone.

Code layout keeps the real test set out of reach: it is passed as a loader that
is called only after every classifier has finished training and selecting -
unless test-set-selection itself is requested - and then read in a single pass
that scores all selected checkpoints at once.

Training and scoring a classifier live in `classifier_fit`; the result types in `results`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from dpsynth.errors import BadInput
from dpsynth.evaluation.checks import check_images, check_label_values, check_labels
from dpsynth.evaluation.classifier_fit import (Progress, accuracies_in_one_pass, build, classification_accuracy,
                                               correct_count, synthetic_split, train_with_rules)
from dpsynth.evaluation.classifiers import classifier_names
from dpsynth.evaluation.results import NoisyVal, ProtocolResult
from dpsynth.evaluation.selection import (DP_SAFE, DPIMAGEBENCH_VAL, NOISY_VAL, PROTOCOLS, TEST_SET, best_epoch,
                                          check_protocol)
from dpsynth.mechanisms.noisy_val import add_noise
from dpsynth.validation import check_positive

# Called at most once, when the real test set is first needed: returns (images, labels or None).
TestLoader = Callable[[], tuple]
# "dpimagebench" stands for the three classifiers DPImageBench trains.
CLASSIFIER_GROUPS = {"dpimagebench": ("resnet", "wrn", "resnext"), "all": ("cnn", "resnet", "wrn", "resnext")}


def parse_classifiers(spec: str | Sequence[str]) -> list[str]:
    """"cnn", "resnet,wrn", "dpimagebench" (its three) or "all" -> list of registered names, in order."""
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    names: list[str] = []
    for part in (p.strip() for p in parts):
        for name in CLASSIFIER_GROUPS.get(part, (part,)):
            if name not in classifier_names():
                allowed = ", ".join([*classifier_names(), *CLASSIFIER_GROUPS])
                raise BadInput(f"classifier={part!r} is unknown; allowed: {allowed} (comma-separated)")
            if name not in names:
                names.append(name)
    if not names:
        raise BadInput("`classifier` is empty; give at least one of " + ", ".join(classifier_names()))
    return names


def _check_test_metadata(test_images, test_labels, synthetic_shape) -> None:
    """Shape/length checks on the real test set that read no pixel and no label."""
    if isinstance(test_images, torch.Tensor):
        check_images(test_images, "test_images")
        check_labels(test_labels, test_images.shape[0], "test_labels")
        if tuple(test_images.shape[1:]) != tuple(synthetic_shape):
            raise BadInput(
                f"test_images have shape {tuple(test_images.shape[1:])} per image; "
                f"expected {tuple(synthetic_shape)} like the synthetic set"
            )
    elif isinstance(test_images, Dataset):
        if test_labels is not None:
            raise BadInput("test_labels must be None when test_images is a Dataset of (image, label) pairs")
        if len(test_images) == 0:
            raise BadInput("test set is empty; at least one image is required")
    else:
        raise BadInput(f"test_images must be a uint8 tensor or a Dataset, got {type(test_images).__name__}")


def _check_settings(protocols, classifiers, epochs, batch_size, lr, num_classes, image_shape) -> None:
    if not protocols:
        raise BadInput("no protocol given; choose one or more of " + ", ".join(PROTOCOLS))
    for protocol in protocols:
        check_protocol(protocol)
    for classifier in classifiers:
        if classifier not in classifier_names():
            raise BadInput(f"unknown classifier {classifier!r}; allowed: {', '.join(classifier_names())}")
    check_positive("epochs", epochs, integer=True)
    check_positive("batch_size", batch_size, integer=True)
    check_positive("lr", lr)
    if num_classes < 2:
        raise BadInput(f"num_classes must be >= 2, got {num_classes}")
    if image_shape[1] != image_shape[2]:
        raise BadInput(f"images must be square, got {image_shape[1]}x{image_shape[2]}")


def _holdout_size(protocol: str, noisy_val: NoisyVal | None, sensitive_val: tuple | None) -> int:
    if protocol == NOISY_VAL:
        return int(noisy_val.images.shape[0])
    if protocol == DPIMAGEBENCH_VAL:
        return int(sensitive_val[0].shape[0])
    return 0


def evaluate_protocols(
    synthetic_images: torch.Tensor,
    synthetic_labels: torch.Tensor,
    load_test: TestLoader,
    num_classes: int,
    *,
    protocols: Sequence[str] = (DP_SAFE,),
    classifiers: Sequence[str] = ("cnn",),
    noisy_val: NoisyVal | None = None,
    sensitive_val: tuple | None = None,
    epochs: int = 10,
    batch_size: int = 256,
    lr: float = 1e-3,
    val_fraction: float = 1 / 12,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> dict[str, ProtocolResult]:
    """Real-test accuracy of every classifier under every protocol, from one training run each.

    ``load_test()`` returns (uint8 tensor (N,C,H,W), labels (N,)) or (Dataset of (image, label), None).
    It is called once: before training only when test-set-selection is requested, otherwise after
    every classifier has finished and every checkpoint is chosen. ``noisy_val`` is required for
    noisy-val; the ledger event covering its noise must already be recorded by the caller.
    ``sensitive_val`` (images, labels) is required for dpimagebench-val (no noise: NOT DP).
    """
    check_images(synthetic_images, "synthetic_images")
    check_labels(synthetic_labels, synthetic_images.shape[0], "synthetic_labels")
    image_shape = tuple(synthetic_images.shape[1:])
    protocols, classifiers = list(dict.fromkeys(protocols)), list(dict.fromkeys(classifiers))
    _check_settings(protocols, classifiers, epochs, batch_size, lr, num_classes, image_shape)
    check_label_values(synthetic_labels, num_classes, "synthetic_labels")
    if (NOISY_VAL in protocols) != (noisy_val is not None):
        raise BadInput("noisy-val needs the sensitive hold-out (and only noisy-val uses it)")
    if (DPIMAGEBENCH_VAL in protocols) != (sensitive_val is not None):
        raise BadInput("dpimagebench-val needs the sensitive validation split `sensitive_val` (and only it uses it)")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise BadInput(f"invalid device {device!r}: {exc}") from None

    test: dict = {}

    def test_set() -> tuple:
        if not test:  # the only call of load_test
            images, labels = load_test()
            _check_test_metadata(images, labels, image_shape)
            test["data"] = (images, labels)
        return test["data"]

    def accuracy_on(data, phase):
        def score(m: nn.Module) -> float:
            x, y = data() if callable(data) else data
            return classification_accuracy(m, x, y, num_classes, image_shape=image_shape, batch_size=batch_size,
                                           device=device, phase=phase)
        return score

    labels = synthetic_labels.long()
    train_x, train_y, val_x, val_y = synthetic_split(synthetic_images, labels, val_fraction, seed)
    rules: dict[str, Callable[[nn.Module], float]] = {}
    if DP_SAFE in protocols:
        rules[DP_SAFE] = accuracy_on((val_x, val_y), "validation")
    if NOISY_VAL in protocols:
        check_labels(noisy_val.labels, noisy_val.images.shape[0], "holdout labels")
        if tuple(noisy_val.images.shape[1:]) != image_shape:
            raise BadInput(f"hold-out images are {tuple(noisy_val.images.shape[1:])}; expected {image_shape}")
        m = noisy_val.images.shape[0]

        def on_holdout(model: nn.Module) -> float:
            # The raw count exists only here; the event covering its noise is already in the ledger.
            raw = correct_count(model, noisy_val.images, noisy_val.labels, batch_size=batch_size, device=device)
            return add_noise(raw, noisy_val.noise, noisy_val.scale, noisy_val.rng) / m

        rules[NOISY_VAL] = on_holdout
    if DPIMAGEBENCH_VAL in protocols:
        val_images, val_labels = sensitive_val
        check_images(val_images, "sensitive_val images")
        check_labels(val_labels, val_images.shape[0], "sensitive_val labels")
        if tuple(val_images.shape[1:]) != image_shape:
            raise BadInput(f"sensitive_val images are {tuple(val_images.shape[1:])}; expected {image_shape}")
        # NOT DP: DPImageBench's evaluator selects on the exact accuracy of a sensitive split.
        rules[DPIMAGEBENCH_VAL] = accuracy_on((val_images, val_labels.long()), "validation (sensitive, NOT DP)")
    if TEST_SET in protocols:
        test_set()  # NOT DP: the flawed practice reads the test set every epoch
        rules[TEST_SET] = accuracy_on(test_set, "test (selection, NOT DP)")

    scores: dict[str, dict[str, list[float]]] = {p: {} for p in protocols}
    chosen: dict[tuple[str, str], nn.Module] = {}
    for classifier in classifiers:
        model, per_rule, best = train_with_rules(
            train_x, train_y, num_classes, rules, classifier=classifier, epochs=epochs, batch_size=batch_size,
            lr=lr, seed=seed, device=device, progress=progress, label=classifier)
        for protocol in protocols:
            scores[protocol][classifier] = per_rule[protocol]
            if protocol != TEST_SET:
                replica = build(classifier, image_shape, num_classes).to(device)
                replica.load_state_dict(best[protocol])
                chosen[(protocol, classifier)] = replica
        del model, best

    # The single final report: every selected checkpoint scored in one pass over the test set.
    final = {}
    if chosen:
        images, test_labels = test_set()
        final = accuracies_in_one_pass(chosen, images, test_labels, num_classes, image_shape=image_shape,
                                       batch_size=batch_size, device=device, progress=progress, phase="test")
    results = {}
    for protocol in protocols:
        epochs_chosen = {c: best_epoch(scores[protocol][c]) for c in classifiers}
        if protocol == TEST_SET:
            accs = {c: scores[protocol][c][epochs_chosen[c] - 1] for c in classifiers}
        else:
            accs = {c: final[(protocol, c)] for c in classifiers}
        results[protocol] = ProtocolResult(
            protocol=protocol, accuracies={c: float(a) for c, a in accs.items()}, selected_epochs=epochs_chosen,
            scores={c: [float(v) for v in scores[protocol][c]] for c in classifiers},
            train_size=int(train_x.shape[0]), val_size=int(val_x.shape[0]), epochs=epochs,
            holdout_size=_holdout_size(protocol, noisy_val, sensitive_val))
    return results
