"""Which private optimizer a DP-SGD loop uses: opacus' DPOptimizer or EFSGD's error feedback.

Both receive per-sample gradients in `p.grad_sample`, clip, add Gaussian noise and step;
they differ in what the noise is added to and how large it must be. The ledger event is
always a PoissonGaussianEvent with the ACCOUNTED noise multiplier; `make_private_optimizer`
returns an optimizer whose released update is at least as private as that event says.
"""

from __future__ import annotations

from opacus.optimizers import DPOptimizer
from torch.optim import Optimizer

from ..errors import BadInput

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
