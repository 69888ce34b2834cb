"""Classifier training and scoring on synthetic data: one training run per classifier with every
selection rule applied after each epoch, and top-1 accuracy over a single pass of a test set."""

from __future__ import annotations

from typing import Callable, Iterator, Union

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from dpsynth.errors import BadInput
from dpsynth.evaluation.checks import check_label_values
from dpsynth.evaluation.classifiers import build_classifier, published_options
from dpsynth.evaluation.splits import stratified_split

Progress = Callable[[str, int, int], None]
# Real test data: tensors, or a Dataset of (uint8 image (C,H,W), label) pairs whose reads can be audited.
TestImages = Union[torch.Tensor, Dataset]


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
    correct = {key: torch.zeros((), dtype=torch.long, device=device) for key in models}  # read once, at the end
    seen = 0
    for done, (x, y) in enumerate(_batches(images, labels, batch_size), start=1):
        y = torch.as_tensor(y)
        if x.dtype != torch.uint8 or tuple(x.shape[1:]) != tuple(image_shape):
            raise BadInput(
                f"{phase} images have dtype {x.dtype} and shape {tuple(x.shape[1:])}; "
                f"expected uint8 {tuple(image_shape)} like the synthetic set"
            )
        check_label_values(y, num_classes, f"{phase} labels")
        x, y_on = _to_unit_range(x.to(device)), y.to(device).long()
        for key, model in models.items():
            correct[key] += (model(x).argmax(1) == y_on).sum()
        seen += y.numel()
        if progress is not None:
            progress(phase, done, total_batches)
    if seen == 0:
        raise BadInput(f"{phase} set is empty; at least one image is required")
    return {key: int(c) / seen for key, c in correct.items()}


def correct_count(model, images, labels, *, batch_size: int, device) -> int:
    """Number of correct top-1 predictions (the noisy-val query, before noise)."""
    model.eval()
    hits = torch.zeros((), dtype=torch.long, device=device)
    with torch.no_grad():
        for x, y in _tensor_batches(images, labels, batch_size):
            hits += (model(_to_unit_range(x.to(device))).argmax(1) == y.to(device).long()).sum()
    return int(hits)


def classification_accuracy(model: nn.Module, images: TestImages, labels: torch.Tensor | None, num_classes: int,
                            **kwargs) -> float:
    """Top-1 accuracy of one model over one pass of (images, labels)."""
    return accuracies_in_one_pass({0: model}, images, labels, num_classes, **kwargs)[0]


def _train_one_epoch(model, opt, images, labels, batch_size, device, gen, progress, step, total_steps,
                     phase="train") -> int:
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    order = torch.randperm(images.shape[0], generator=gen).to(images.device)  # CPU generator: any device
    for start in range(0, order.numel(), batch_size):
        idx = order[start : start + batch_size]
        x = _to_unit_range(images[idx].to(device))  # no-ops: train_with_rules moved the set to `device`
        y = labels[idx].to(device)
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        step += 1
        if progress is not None:
            progress(phase, step, total_steps)
    return step


def build(classifier: str, image_shape, num_classes: int) -> nn.Module:
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
    train_x, train_y = train_x.to(device), train_y.to(device)  # once: batches are then indexed on the device
    model = build(classifier, image_shape, num_classes).to(device)
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


def synthetic_split(images: torch.Tensor, labels: torch.Tensor, val_fraction: float, seed: int):
    """(train_x, train_y, val_x, val_y): stratified, 1/12 to validation by default (55k/5k of 60k)."""
    train_idx, val_idx = stratified_split(labels, val_fraction, seed)
    return images[train_idx], labels[train_idx], images[val_idx], labels[val_idx]
