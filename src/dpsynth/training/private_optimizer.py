"""Which private optimizer a DP-SGD loop uses: opacus' DPOptimizer or EFSGD's error feedback.

Both receive per-sample gradients in `p.grad_sample`, clip, add Gaussian noise and step;
they differ in what the noise is added to and how large it must be, and so in their
ledger events, which `dpsynth.privacy.plans` plans (torch-free) with the same `kind`:

    c2 = resolve_feedback_clip(kind, given_c2, clip=C1, sample_rate=q)            # privacy.plans
    sigma = calibrate_private_optimizer(kind, spent, eps, delta, ...)             # privacy.plans
    events = private_optimizer_events(kind, stage, noise_multiplier=sigma, ...)   # record before the first step
    optimizer = make_private_optimizer(kind, base, noise_multiplier=sigma, clip=C1, expected_batch_size=q*N,
                                       feedback_clip=c2)
"""

from __future__ import annotations

from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from torch.optim import Optimizer

from ..privacy.plans import check_private_optimizer


def make_private_optimizer(kind: str, base: Optimizer, *, noise_multiplier: float, clip: float,
                           expected_batch_size: float, secure: bool = False,
                           feedback_clip: float | None = None, clipped_sums: bool = False,
                           generator=None) -> DPOptimizer:
    """An opacus-compatible optimizer (DPOptimizer or subclass) over `base`.

    clipped_sums: the caller leaves the already clipped per-example SUM in p.grad (book-keeping,
    `training.bookkeeping`): opacus' DPOptimizerFastGradientClipping sums it over the physical
    chunks, adds N(0, (noise_multiplier * clip)^2) once and divides by expected_batch_size.
    generator: the noise's source; with `secure`, opacus' CSPRNG (PrivacyEngine.secure_rng), without
    which opacus would draw the noise from the global RNG."""
    check_private_optimizer(kind, "bk" if clipped_sums else None, feedback_clip=feedback_clip)
    if clipped_sums:
        return DPOptimizerFastGradientClipping(base, noise_multiplier=noise_multiplier, max_grad_norm=clip,
                                               expected_batch_size=expected_batch_size, loss_reduction="mean",
                                               generator=generator, secure_mode=secure)
    if kind == "efsgd":
        from .efsgd import EFSGDOptimizer

        return EFSGDOptimizer(base, noise_multiplier=noise_multiplier, max_grad_norm=clip,
                              expected_batch_size=expected_batch_size, secure_mode=secure,
                              feedback_clip=feedback_clip, generator=generator)
    return DPOptimizer(base, noise_multiplier=noise_multiplier, max_grad_norm=clip,
                       expected_batch_size=expected_batch_size, loss_reduction="mean", generator=generator,
                       secure_mode=secure)
