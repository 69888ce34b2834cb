"""Downstream utility: train classifiers on synthetic data, test them on real data.

Three checkpoint-selection protocols (rules in `selection`): DP-safe selection on a
synthetic validation split, noisy-val on a sensitive hold-out with ledger-charged
noise, and the flawed test-set selection (never DP). `evaluate_protocols` trains each
classifier ONCE on the synthetic-train split and applies every requested rule to that
one trajectory, so a comparison measures the selection rule alone.

Code layout keeps the real test set out of reach: it is passed as a loader that
is called only after every classifier has finished training and selecting -
unless test-set-selection itself is requested - and then read in a single pass
that scores all selected checkpoints at once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from dpsynth.errors import BadInput
from dpsynth.evaluation.checks import check_images, check_label_values, check_labels
from dpsynth.evaluation.classifiers import build_classifier, classifier_names, published_options
from dpsynth.evaluation.selection import DP_SAFE, NOISY_VAL, PROTOCOLS, TEST_SET, best_epoch, check_protocol, is_dp_safe
from dpsynth.mechanisms.noisy_val import add_noise
from dpsynth.evaluation.splits import stratified_split
from dpsynth.validation import check_positive

Progress = Callable[[str, int, int], None]
# Real test data: tensors, or a Dataset of (uint8 image (C,H,W), label) pairs whose reads can be audited.
TestImages = Union[torch.Tensor, Dataset]
# Called at most once, when the real test set is first needed: returns (images, labels or None).
TestLoader = Callable[[], tuple]
# "dpimagebench" stands for the three classifiers DPImageBench trains.
CLASSIFIER_GROUPS = {"dpimagebench": ("resnet", "wrn", "resnext"), "all": ("cnn", "resnet", "wrn", "resnext")}


@dataclass
class UtilityResult:
    protocol: str
    classifier: str
    accuracy: float  # real-test accuracy of the selected checkpoint, in [0, 1]
    selected_epoch: int  # 1-based
    val_accuracies: list[float]  # per-epoch selection scores (real-test ones under test-set-selection)
    train_size: int
    val_size: int
    epochs: int

    @property
    def dp_safe(self) -> bool:
        return is_dp_safe(self.protocol)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["dp_safe"] = self.dp_safe
        return out


@dataclass
class FitOutcome:
    """A classifier holding the selected checkpoint's weights, plus how it was chosen."""

    model: nn.Module
    selected_epoch: int  # 1-based
    selection_accuracies: list[float] = field(default_factory=list)
    train_size: int = 0
    val_size: int = 0


@dataclass
class NoisyVal:
    """The sensitive hold-out and the noise its per-epoch counts get (scale from the ledger event)."""

    images: torch.Tensor
    labels: torch.Tensor
    noise: str  # "laplace" (scale b) or "gaussian" (std)
    scale: float  # per count
    rng: np.random.Generator


@dataclass
class ProtocolResult:
    """One protocol over one or more classifiers, each trained once on the synthetic-train split."""

    protocol: str
    accuracies: dict[str, float]  # classifier -> real-test accuracy of its selected checkpoint
    selected_epochs: dict[str, int]  # classifier -> 1-based epoch
    scores: dict[str, list[float]]  # classifier -> per-epoch selection scores
    train_size: int
    val_size: int
    epochs: int
    holdout_size: int = 0

    @property
    def dp_safe(self) -> bool:
        return is_dp_safe(self.protocol)

    @property
    def best_classifier(self) -> str:
        return max(self.accuracies, key=lambda name: (self.accuracies[name], -list(self.accuracies).index(name)))

    @property
    def accuracy_best(self) -> float:
        """Max over classifiers of real-test accuracy: how DPImageBench's tables report utility."""
        return self.accuracies[self.best_classifier]

    @property
    def accuracy_mean(self) -> float:
        return float(np.mean(list(self.accuracies.values())))

    def to_dict(self) -> dict:
        return {"protocol": self.protocol, "dp_safe": self.dp_safe, "classifiers": list(self.accuracies),
                "accuracy_best": self.accuracy_best, "best_classifier": self.best_classifier,
                "accuracy_mean": self.accuracy_mean,
                "per_classifier": {name: {"accuracy": acc, "selected_epoch": self.selected_epochs[name],
                                          "selection_scores": [round(v, 4) for v in self.scores[name]]}
                                   for name, acc in self.accuracies.items()},
                "train_size": self.train_size, "val_size": self.val_size, "holdout_size": self.holdout_size,
                "epochs": self.epochs}


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


def _to_unit_range(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(127.5).sub_(1.0)


def _tensor_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> Iterator[tuple]:
    for start in range(0, images.shape[0], batch_size):
        yield images[start : start + batch_size], labels[start : start + batch_size]


def _batches(images: TestImages, labels: torch.Tensor | None, batch_size: int) -> Iterator[tuple]:
    if isinstance(images, Dataset) and not isinstance(images, torch.Tensor):
        # num_workers=0: reads happen in this process, in order, where they can be counted.
        yield from DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=0)
    else:
        yield from _tensor_batches(images, labels, batch_size)


def _num_items(images: TestImages) -> int:
    return images.shape[0] if isinstance(images, torch.Tensor) else len(images)


@torch.no_grad()
def accuracies_in_one_pass(
    models: dict,
    images: TestImages,
    labels: torch.Tensor | None,
    num_classes: int,
    *,
    image_shape: tuple[int, int, int],
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    phase: str = "test",
) -> dict:
    """Top-1 accuracy of every model in `models` over ONE pass of (images, labels): each item is
    read once however many checkpoints are scored. Label and shape checks happen batch by batch."""
    for model in models.values():
        model.eval()
    total_batches = -(-_num_items(images) // batch_size)
    correct = dict.fromkeys(models, 0)
    seen = 0
    for done, (x, y) in enumerate(_batches(images, labels, batch_size), start=1):
        y = torch.as_tensor(y)
        if x.dtype != torch.uint8 or tuple(x.shape[1:]) != tuple(image_shape):
            raise BadInput(
                f"{phase} images have dtype {x.dtype} and shape {tuple(x.shape[1:])}; "
                f"expected uint8 {tuple(image_shape)} like the synthetic set"
            )
        check_label_values(y, num_classes, f"{phase} labels")
        x = _to_unit_range(x.to(device))
        for key, model in models.items():
            correct[key] += int((model(x).argmax(1).cpu() == y.long()).sum())
        seen += y.numel()
        if progress is not None:
            progress(phase, done, total_batches)
    if seen == 0:
        raise BadInput(f"{phase} set is empty; at least one image is required")
    return {key: c / seen for key, c in correct.items()}


def correct_count(model, images, labels, *, batch_size: int, device) -> int:
    """Number of correct top-1 predictions (the noisy-val query, before noise)."""
    model.eval()
    hits = 0
    with torch.no_grad():
        for x, y in _tensor_batches(images, labels, batch_size):
            hits += int((model(_to_unit_range(x.to(device))).argmax(1).cpu() == y.long()).sum())
    return hits


def classification_accuracy(model: nn.Module, images: TestImages, labels: torch.Tensor | None, num_classes: int,
                            **kwargs) -> float:
    """Top-1 accuracy of one model over one pass of (images, labels)."""
    return accuracies_in_one_pass({0: model}, images, labels, num_classes, **kwargs)[0]


def _train_one_epoch(model, opt, images, labels, batch_size, device, gen, progress, step, total_steps,
                     phase="train") -> int:
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    order = torch.randperm(images.shape[0], generator=gen)
    for start in range(0, order.numel(), batch_size):
        idx = order[start : start + batch_size]
        x = _to_unit_range(images[idx].to(device))
        y = labels[idx].to(device)
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        step += 1
        if progress is not None:
            progress(phase, step, total_steps)
    return step


def _build(classifier: str, image_shape, num_classes: int) -> nn.Module:
    channels, resolution = image_shape[0], image_shape[1]
    return build_classifier(classifier, channels, num_classes, resolution,
                            **published_options(classifier, channels, resolution))


def _clone_state(model: nn.Module) -> dict:
    # Clone: state_dict() returns live references that later steps would overwrite.
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_with_rules(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    num_classes: int,
    rules: dict[str, Callable[[nn.Module], float]],
    *,
    classifier: str,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    device,
    progress: Progress | None = None,
    label: str = "",
) -> tuple[nn.Module, dict[str, list[float]], dict[str, dict]]:
    """Train one classifier on synthetic data; after each epoch, score it with every rule and keep,
    per rule, the weights of its first best epoch. Returns (model, scores per rule, best state per rule)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    image_shape = tuple(train_x.shape[1:])
    model = _build(classifier, image_shape, num_classes).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    total_steps = epochs * -(-train_x.shape[0] // batch_size)
    scores: dict[str, list[float]] = {name: [] for name in rules}
    best: dict[str, dict] = {}
    step = 0
    suffix = f" {label}" if label else ""
    for epoch in range(1, epochs + 1):
        step = _train_one_epoch(model, opt, train_x, train_y, batch_size, device, gen, progress, step,
                                total_steps, phase="train" + suffix)
        for name, rule in rules.items():
            score = rule(model)
            history = scores[name]
            if not history or score > max(history):
                best[name] = _clone_state(model)
            history.append(score)
        if progress is not None:
            progress("validate" + suffix, epoch, epochs)
    return model, scores, best


def fit_with_selection(
    synthetic_images: torch.Tensor,
    synthetic_labels: torch.Tensor,
    num_classes: int,
    *,
    select_on: Callable[[nn.Module], float] | None = None,
    classifier: str = "cnn",
    epochs: int = 10,
    batch_size: int = 256,
    lr: float = 1e-3,
    val_fraction: float = 1 / 12,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> FitOutcome:
    """Train on the synthetic-train split and keep the checkpoint that scores best after some epoch.

    With ``select_on=None`` the score is accuracy on the stratified synthetic
    hold-out (DP-safe); otherwise ``select_on(model)`` gives it. Ties go to the
    earliest epoch. Inputs are assumed already validated by the caller.
    """
    device = torch.device(device)
    labels = synthetic_labels.long()
    train_x, train_y, val_x, val_y = synthetic_split(synthetic_images, labels, val_fraction, seed)
    image_shape = tuple(synthetic_images.shape[1:])

    def on_val(m: nn.Module) -> float:
        return classification_accuracy(m, val_x, val_y, num_classes, image_shape=image_shape,
                                       batch_size=batch_size, device=device, phase="validation")

    model, scores, best = train_with_rules(
        train_x, train_y, num_classes, {"select": select_on or on_val}, classifier=classifier, epochs=epochs,
        batch_size=batch_size, lr=lr, seed=seed, device=device, progress=progress)
    model.load_state_dict(best["select"])
    model.eval()
    return FitOutcome(model, best_epoch(scores["select"]), scores["select"], int(train_x.shape[0]),
                      int(val_x.shape[0]))


def synthetic_split(images: torch.Tensor, labels: torch.Tensor, val_fraction: float, seed: int):
    """(train_x, train_y, val_x, val_y): stratified, 1/12 to validation by default (55k/5k of 60k)."""
    train_idx, val_idx = stratified_split(labels, val_fraction, seed)
    return images[train_idx], labels[train_idx], images[val_idx], labels[val_idx]


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


def evaluate_protocols(
    synthetic_images: torch.Tensor,
    synthetic_labels: torch.Tensor,
    load_test: TestLoader,
    num_classes: int,
    *,
    protocols: Sequence[str] = (DP_SAFE,),
    classifiers: Sequence[str] = ("cnn",),
    noisy_val: NoisyVal | None = None,
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
    """
    check_images(synthetic_images, "synthetic_images")
    check_labels(synthetic_labels, synthetic_images.shape[0], "synthetic_labels")
    image_shape = tuple(synthetic_images.shape[1:])
    protocols, classifiers = list(dict.fromkeys(protocols)), list(dict.fromkeys(classifiers))
    _check_settings(protocols, classifiers, epochs, batch_size, lr, num_classes, image_shape)
    check_label_values(synthetic_labels, num_classes, "synthetic_labels")
    if (NOISY_VAL in protocols) != (noisy_val is not None):
        raise BadInput("noisy-val needs the sensitive hold-out (and only noisy-val uses it)")
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
                replica = _build(classifier, image_shape, num_classes).to(device)
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
            holdout_size=int(noisy_val.images.shape[0]) if protocol == NOISY_VAL else 0)
    return results


def evaluate_utility(
    synthetic_images: torch.Tensor,
    synthetic_labels: torch.Tensor,
    test_images: TestImages,
    test_labels: torch.Tensor | None,
    num_classes: int,
    *,
    protocol: str = DP_SAFE,
    classifier: str = "cnn",
    noisy_val: NoisyVal | None = None,
    epochs: int = 10,
    batch_size: int = 256,
    lr: float = 1e-3,
    val_fraction: float = 1 / 12,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> UtilityResult:
    """One protocol, one classifier: `evaluate_protocols` with the test set already in memory (or a Dataset).

    Test labels are range-checked while the single final pass reads them, not before.
    """
    check_protocol(protocol)
    result = evaluate_protocols(
        synthetic_images, synthetic_labels, lambda: (test_images, test_labels), num_classes,
        protocols=[protocol], classifiers=[classifier], noisy_val=noisy_val, epochs=epochs, batch_size=batch_size,
        lr=lr, val_fraction=val_fraction, seed=seed, device=device, progress=progress)[protocol]
    return UtilityResult(protocol=protocol, classifier=classifier, accuracy=result.accuracies[classifier],
                         selected_epoch=result.selected_epochs[classifier], val_accuracies=result.scores[classifier],
                         train_size=result.train_size, val_size=result.val_size, epochs=epochs)
