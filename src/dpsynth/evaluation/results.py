"""What the utility evaluation hands back: one protocol's accuracies over its classifiers, and the
noisy-val hold-out with its (ledger-recorded) noise."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dpsynth.evaluation.selection import is_dp_safe


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
        """Max over classifiers of real-test accuracy (DPImageBench's tables report the mean instead)."""
        return self.accuracies[self.best_classifier]

    @property
    def accuracy_mean(self) -> float:
        """Mean over classifiers of real-test accuracy: the headline, as DPImageBench's tables report it."""
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
