"""Test-only conveniences over the evaluation library (they used to live in src/ with no caller
there): one protocol and one classifier with the test set in memory (`evaluate_utility`), one
selected fit (`fit_with_selection`) and FID/KID between two image sets (`compute_fidelity`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from dpsynth.errors import BadInput
from dpsynth.evaluation.checks import check_images
from dpsynth.evaluation.classifier_fit import (Progress, TestImages, classification_accuracy, synthetic_split,
                                               train_with_rules)
from dpsynth.evaluation.fidelity import FeatureNetwork, extract_features, fid_from_features, kid_from_features
from dpsynth.evaluation.results import NoisyVal
from dpsynth.evaluation.selection import DP_SAFE, best_epoch, check_protocol, is_dp_safe
from dpsynth.evaluation.utility import evaluate_protocols
from dpsynth.validation import check_positive


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


def compute_fidelity(real_images: torch.Tensor, fake_images: torch.Tensor, feature_net: FeatureNetwork, *,
                     device: str | torch.device = "cpu", batch_size: int = 256, kid: bool = True, kid_seed: int = 0,
                     progress: Progress | None = None) -> dict:
    """FID (and KID) between two uint8 image sets on `feature_net`:
    {"fid", "kid" (None when kid=False), "feature_network", "n_real", "n_fake"}."""
    check_images(real_images, "real_images")
    check_images(fake_images, "fake_images")
    if not isinstance(feature_net, FeatureNetwork) or not feature_net.name:
        raise BadInput("feature_net must be a FeatureNetwork with a non-empty name")
    check_positive("batch_size", batch_size, integer=True)
    for what, imgs in (("real_images", real_images), ("fake_images", fake_images)):
        if imgs.shape[0] < 2:
            raise BadInput(f"{what} has {imgs.shape[0]} image(s); FID needs at least 2 per set")
    real, fake = (extract_features(images, feature_net, device=device, batch_size=batch_size, progress=progress,
                                   phase=phase)
                  for images, phase in ((real_images, "features-real"), (fake_images, "features-fake")))
    if real.shape[1] != fake.shape[1]:
        raise BadInput(f"feature dims differ: real {real.shape[1]} vs fake {fake.shape[1]}")
    return {"fid": fid_from_features(real, fake), "kid": kid_from_features(real, fake, kid_seed) if kid else None,
            "feature_network": feature_net.name, "n_real": int(real.shape[0]), "n_fake": int(fake.shape[0])}
