"""Which private optimizer a DP-SGD loop uses: opacus' DPOptimizer or EFSGD's error feedback.

Both receive per-sample gradients in `p.grad_sample`, clip, add Gaussian noise and step;
they differ in what the noise is added to and how large it must be, and so in their
ledger events. A caller plans with the same `kind` throughout:

    c2 = resolve_feedback_clip(kind, given_c2, clip=C1, sample_rate=q)
    sigma = calibrate_private_optimizer(kind, spent, eps, delta, sample_rate=q, steps=T, clip=C1, feedback_clip=c2)
    events = private_optimizer_events(kind, stage, noise_multiplier=sigma, sample_rate=q, steps=T, clip=C1,
                                      feedback_clip=c2)          # record ALL of them before the first step
    optimizer = make_private_optimizer(kind, base, noise_multiplier=sigma, clip=C1, expected_batch_size=q*N,
                                       feedback_clip=c2)

"dpsgd": one PoissonGaussianEvent(sigma, q, T). "efsgd": a non-subsampled GaussianEvent for
the error feedback (its hidden state is not subsampled) and the PoissonGaussianEvent, last;
see `training/efsgd.py` for the derivation.
"""

from __future__ import annotations

from typing import Sequence

from opacus.optimizers import DPOptimizer
from torch.optim import Optimizer

from ..errors import BadInput
from ..privacy.accountant import calibrate_noise_multiplier
from ..privacy.events import PoissonGaussianEvent, PrivacyEvent

PRIVATE_OPTIMIZERS = ("dpsgd", "efsgd")


def check_private_optimizer(kind: str, grad_sample_mode: str | None = None, feedback_clip: float | None = None) -> None:
    if kind not in PRIVATE_OPTIMIZERS:
        raise BadInput(f"--optimizer {kind!r} is unknown; choose one of {', '.join(PRIVATE_OPTIMIZERS)}")
    if kind == "dpsgd" and feedback_clip is not None:
        raise BadInput("--feedback-clip is a setting of --optimizer efsgd; drop it or pass --optimizer efsgd")
    if kind == "efsgd" and grad_sample_mode == "ghost":
        raise BadInput("--optimizer efsgd needs each example's gradient (its error state is the unclipped mean); "
                       "use --grad-sample-mode vmap, hooks or functorch")


def make_private_optimizer(kind: str, base: Optimizer, *, noise_multiplier: float, clip: float,
                           expected_batch_size: float, secure: bool = False,
                           feedback_clip: float | None = None) -> DPOptimizer:
    """An opacus-compatible optimizer (DPOptimizer or subclass) over `base`."""
    check_private_optimizer(kind, feedback_clip=feedback_clip)
    if kind == "efsgd":
        from .efsgd import EFSGDOptimizer

        return EFSGDOptimizer(base, noise_multiplier=noise_multiplier, max_grad_norm=clip,
                              expected_batch_size=expected_batch_size, secure_mode=secure,
                              feedback_clip=feedback_clip)
    return DPOptimizer(base, noise_multiplier=noise_multiplier, max_grad_norm=clip,
                       expected_batch_size=expected_batch_size, loss_reduction="mean", secure_mode=secure)


def resolve_feedback_clip(kind: str, feedback_clip: float | None, *, clip: float, sample_rate: float) -> float | None:
    """EFSGD's C2 (its default when not given); None for dpsgd."""
    check_private_optimizer(kind, feedback_clip=feedback_clip)
    if kind != "efsgd":
        return None
    from .efsgd import check_feedback_clip, default_feedback_clip

    return check_feedback_clip(default_feedback_clip(clip, sample_rate) if feedback_clip is None else feedback_clip)


def private_optimizer_events(kind: str, stage: str, *, noise_multiplier: float, sample_rate: float, steps: int,
                             clip: float, feedback_clip: float | None = None) -> list[PrivacyEvent]:
    """Every ledger event of `steps` steps of this optimizer; the PoissonGaussianEvent is last."""
    check_private_optimizer(kind, feedback_clip=feedback_clip)
    if kind == "efsgd":
        from .efsgd import efsgd_events

        return efsgd_events(stage, noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps,
                            clip=clip, feedback_clip=feedback_clip)
    return [PoissonGaussianEvent(stage=stage, noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                                 steps=steps)]


def calibrate_private_optimizer(kind: str, spent: Sequence[PrivacyEvent], target_epsilon: float, delta: float, *,
                                sample_rate: float, steps: int, clip: float, feedback_clip: float | None = None,
                                stage: str = "finetune") -> float:
    """Smallest noise multiplier such that spent + private_optimizer_events(...) fit the target."""
    check_private_optimizer(kind, feedback_clip=feedback_clip)
    if kind == "efsgd":
        from .efsgd import calibrate_efsgd_noise_multiplier

        return calibrate_efsgd_noise_multiplier(spent, target_epsilon, delta, sample_rate=sample_rate, steps=steps,
                                                clip=clip, feedback_clip=feedback_clip, stage=stage)
    return calibrate_noise_multiplier(spent, target_epsilon, delta, sample_rate=sample_rate, steps=steps, stage=stage)
