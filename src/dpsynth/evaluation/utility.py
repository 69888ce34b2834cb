"""Downstream utility: train a classifier on synthetic data, test it on real data.

Two checkpoint-selection protocols (DPImageBench, Sec. "evaluation"):

* ``dp-safe-selection``: hold out 1/12 of the *synthetic* set, pick the epoch
  with the best accuracy on it, and evaluate that one checkpoint on the real
  test set exactly once. The real test set plays no part in any choice.
* ``test-set-selection``: the common but flawed practice of reporting the best
  real-test accuracy over epochs. Choosing on the test set is a data-dependent
  selection that the privacy ledger does not cover, so results carry
  ``dp_safe=False``.

Code layout keeps the test set out of reach: `fit_with_selection` never receives
real test data for the DP-safe protocol, and `evaluate_utility` touches it only
after fitting has returned.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Union

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from dpsynth.errors import BadInput
from dpsynth.evaluation.checks import check_images, check_label_values, check_labels
from dpsynth.evaluation.classifiers import build_classifier, classifier_names
from dpsynth.evaluation.splits import stratified_split

DP_SAFE = "dp-safe-selection"
TEST_SET = "test-set-selection"
PROTOCOLS = (DP_SAFE, TEST_SET)

Progress = Callable[[str, int, int], None]
# Real test data: tensors, or a Dataset of (uint8 image (C,H,W), label) pairs whose reads can be audited.
TestImages = Union[torch.Tensor, Dataset]


@dataclass
class UtilityResult:
    protocol: str
    classifier: str
    accuracy: float  # real-test accuracy of the selected checkpoint, in [0, 1]
    selected_epoch: int  # 1-based
    val_accuracies: list[float]  # per-epoch selection accuracy (real-test ones under test-set-selection)
    train_size: int
    val_size: int
    epochs: int

    @property
    def dp_safe(self) -> bool:
        return self.protocol == DP_SAFE

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
def classification_accuracy(
    model: nn.Module,
    images: TestImages,
    labels: torch.Tensor | None,
    num_classes: int,
    *,
    image_shape: tuple[int, int, int],
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    phase: str = "test",
) -> float:
    """Top-1 accuracy over one pass of (images, labels); label and shape checks happen batch by batch."""
    model.eval()
    total_batches = -(-_num_items(images) // batch_size)
    correct = seen = 0
    for done, (x, y) in enumerate(_batches(images, labels, batch_size), start=1):
        y = torch.as_tensor(y)
        if x.dtype != torch.uint8 or tuple(x.shape[1:]) != tuple(image_shape):
            raise BadInput(
                f"{phase} images have dtype {x.dtype} and shape {tuple(x.shape[1:])}; "
                f"expected uint8 {tuple(image_shape)} like the synthetic set"
            )
        check_label_values(y, num_classes, f"{phase} labels")
        logits = model(_to_unit_range(x.to(device)))
        correct += int((logits.argmax(1).cpu() == y.long()).sum())
        seen += y.numel()
        if progress is not None:
            progress(phase, done, total_batches)
    if seen == 0:
        raise BadInput(f"{phase} set is empty; at least one image is required")
    return correct / seen


def _train_one_epoch(model, opt, images, labels, batch_size, device, gen, progress, step, total_steps) -> int:
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
            progress("train", step, total_steps)
    return step


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
    """Train on synthetic data and keep the checkpoint that scores best after some epoch.

    With ``select_on=None`` the score is accuracy on a stratified synthetic
    hold-out (DP-safe). Otherwise the whole synthetic set is trained on and
    ``select_on(model)`` gives the score. Ties go to the earliest epoch.
    Inputs are assumed already validated by the caller.
    """
    device = torch.device(device)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    labels = synthetic_labels.long()
    image_shape = tuple(synthetic_images.shape[1:])

    if select_on is None:
        train_idx, val_idx = stratified_split(labels, val_fraction, seed)
        train_x, train_y = synthetic_images[train_idx], labels[train_idx]
        val_x, val_y = synthetic_images[val_idx], labels[val_idx]

        def select_on(m: nn.Module) -> float:
            return classification_accuracy(
                m, val_x, val_y, num_classes, image_shape=image_shape,
                batch_size=batch_size, device=device, progress=None, phase="validation",
            )

        selection_phase = "validate"
    else:
        train_x, train_y, val_x = synthetic_images, labels, synthetic_images[:0]
        selection_phase = "select"

    model = build_classifier(classifier, image_shape[0], num_classes, image_shape[1]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    total_steps = epochs * -(-train_x.shape[0] // batch_size)

    accuracies: list[float] = []
    best_state: dict | None = None
    step = 0
    for epoch in range(1, epochs + 1):
        step = _train_one_epoch(model, opt, train_x, train_y, batch_size, device, gen, progress, step, total_steps)
        acc = select_on(model)
        accuracies.append(acc)
        if best_state is None or acc > max(accuracies[:-1]):
            # Clone: state_dict() returns live references that later steps would overwrite.
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if progress is not None:
            progress(selection_phase, epoch, epochs)

    model.load_state_dict(best_state)
    model.eval()
    best_epoch = accuracies.index(max(accuracies)) + 1
    return FitOutcome(model, best_epoch, accuracies, int(train_x.shape[0]), int(val_x.shape[0]))


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


def _check_settings(protocol, classifier, epochs, batch_size, lr, num_classes, image_shape) -> None:
    if protocol not in PROTOCOLS:
        raise BadInput(f"unknown protocol {protocol!r}; allowed: {', '.join(PROTOCOLS)}")
    if classifier not in classifier_names():
        raise BadInput(f"unknown classifier {classifier!r}; allowed: {', '.join(classifier_names())}")
    if epochs < 1:
        raise BadInput(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise BadInput(f"batch_size must be >= 1, got {batch_size}")
    if not lr > 0:
        raise BadInput(f"lr must be > 0, got {lr}")
    if num_classes < 2:
        raise BadInput(f"num_classes must be >= 2, got {num_classes}")
    if image_shape[1] != image_shape[2]:
        raise BadInput(f"images must be square, got {image_shape[1]}x{image_shape[2]}")


def evaluate_utility(
    synthetic_images: torch.Tensor,
    synthetic_labels: torch.Tensor,
    test_images: TestImages,
    test_labels: torch.Tensor | None,
    num_classes: int,
    *,
    protocol: str = DP_SAFE,
    classifier: str = "cnn",
    epochs: int = 10,
    batch_size: int = 256,
    lr: float = 1e-3,
    val_fraction: float = 1 / 12,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> UtilityResult:
    """Real-test accuracy of a `classifier` trained on the synthetic set.

    ``test_images`` is a uint8 tensor (N, C, H, W) with ``test_labels`` (N,), or
    a Dataset yielding (image, label) with ``test_labels=None``. Test labels are
    range-checked while the single final pass reads them, not before.
    """
    check_images(synthetic_images, "synthetic_images")
    check_labels(synthetic_labels, synthetic_images.shape[0], "synthetic_labels")
    image_shape = tuple(synthetic_images.shape[1:])
    _check_settings(protocol, classifier, epochs, batch_size, lr, num_classes, image_shape)
    check_label_values(synthetic_labels, num_classes, "synthetic_labels")
    _check_test_metadata(test_images, test_labels, image_shape)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise BadInput(f"invalid device {device!r}: {exc}") from None

    def on_test(model: nn.Module, phase: str) -> float:
        return classification_accuracy(
            model, test_images, test_labels, num_classes, image_shape=image_shape,
            batch_size=batch_size, device=device, progress=progress, phase=phase,
        )

    common = dict(classifier=classifier, epochs=epochs, batch_size=batch_size, lr=lr,
                  val_fraction=val_fraction, seed=seed, device=device, progress=progress)
    if protocol == DP_SAFE:
        fit = fit_with_selection(synthetic_images, synthetic_labels, num_classes, **common)
        # The one and only read of the real test set: the selected checkpoint, once.
        accuracy = on_test(fit.model, "test")
    else:
        fit = fit_with_selection(
            synthetic_images, synthetic_labels, num_classes,
            select_on=lambda m: on_test(m, "test"), **common,
        )
        accuracy = fit.selection_accuracies[fit.selected_epoch - 1]

    return UtilityResult(
        protocol=protocol,
        classifier=classifier,
        accuracy=float(accuracy),
        selected_epoch=fit.selected_epoch,
        val_accuracies=[float(a) for a in fit.selection_accuracies],
        train_size=fit.train_size,
        val_size=fit.val_size,
        epochs=epochs,
    )
