"""EFSGD: DP-SGD with clipped error feedback (DiceSGD), and the privacy events it needs.

The update (EFSGD, arXiv 2601.15061, follows DiceSGD, Zhang, Bu, Wu, Hong, ICLR 2024,
arXiv 2311.14632). Everything is kept in opacus' "sum" units (what is summed over the
Poisson batch B_t before dividing by the expected batch size b = q·N, as opacus does):

    S_t = sum_{i in B_t} clip(g_i, C1)          clipped per-example gradients (opacus)
    F_t = clip(e_t, C2)                          error feedback, clipped over ALL parameters jointly
    grad_t = (S_t + F_t + W_t) / b,   W_t ~ N(0, (sqrt(2)·sigma·C1)^2 I)
    theta_{t+1} = base_optimizer(theta_t, grad_t)
    e_{t+1} = e_t + sum_{i in B_t} g_i - S_t - F_t,   e_0 = 0

Divided by b this is DiceSGD's v = mean clip(g_i, C1) + clip(e, C2/b), e <- e + mean g - v
with "mean" = sum / b (the expected batch size, also for the unclipped mean, so the error
is exactly what clipping removed from the sum). So C2 is in the same units as C1: the
norm of what the feedback adds to the clipped SUM, as in DiceSGD's official code
(github.com/564612540/DiceSGD, DiceSGD/optimizers_utils.py, where C2 = C1·error_max_grad_norm
and the noise std is z·C1·sqrt(1 + 2·C2/C1) on the sum).

Privacy: the two ledger events and their derivation are in `dpsynth.privacy.plans`.

The error state e lives in the base optimizer's state (`state[p]["efsgd_error"]`), so
`training.checkpoint.capture_state` saves it and `--resume` restores it. It is committed
after the base optimizer's step (Adam initialises its state only when it is empty).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _generate_noise, _mark_as_processed
from torch.optim import Optimizer

from ..errors import BadInput
from ..privacy.plans import applied_noise_std, check_feedback_clip

ERROR_KEY = "efsgd_error"


class EFSGDOptimizer(DPOptimizer):
    """opacus DPOptimizer with DiceSGD's clipped error feedback (module docstring).

    noise_multiplier is the sigma of `privacy.plans.private_optimizer_events("efsgd", ...)` (the caller records those events);
    the noise added to the clipped sum has std NOISE_FACTOR·sigma·max_grad_norm.
    Virtual steps (signal_skip_step), empty Poisson batches and step hooks work as in
    DPOptimizer: the unclipped per-example sum is accumulated next to opacus' clipped one.
    """

    # The per-parameter sums over one rank's examples, added up across ranks before the noise
    # step under torchrun (training/distributed.py): the error update needs the global raw sum.
    rank_local_sums = ("summed_grad", "efsgd_raw_sum")

    def __init__(self, optimizer: Optimizer, *, noise_multiplier: float, max_grad_norm: float,
                 expected_batch_size: Optional[float], feedback_clip: float, secure_mode: bool = False,
                 generator=None):
        self.feedback_clip = check_feedback_clip(feedback_clip)
        super().__init__(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                         expected_batch_size=expected_batch_size, loss_reduction="mean", generator=generator,
                         secure_mode=secure_mode)
        for p in self.params:
            p.efsgd_raw_sum = None
            p.efsgd_next_error = None

    @property
    def noise_std(self) -> float:
        return applied_noise_std(self.noise_multiplier, self.max_grad_norm)

    def error_state(self) -> list[torch.Tensor]:
        """e per parameter (zeros before the first step)."""
        return [self.state[p][ERROR_KEY] if ERROR_KEY in self.state[p] else torch.zeros_like(p) for p in self.params]

    def clip_and_accumulate(self):
        # The unclipped sum first: the parent marks grad_sample as used.
        for p in self.params:
            _check_processed_flag(p.grad_sample)
            raw = self._get_flat_grad_sample(p).to(p.dtype).sum(dim=0)
            p.efsgd_raw_sum = raw if p.efsgd_raw_sum is None else p.efsgd_raw_sum + raw
        super().clip_and_accumulate()

    def _feedback(self, errors: list[torch.Tensor]) -> list[torch.Tensor]:
        """clip(e, C2) with the norm taken over all parameters together."""
        norm = float(torch.stack([e.norm(2) for e in errors]).norm(2)) if errors else 0.0
        scale = min(1.0, self.feedback_clip / norm) if norm > 0 else 1.0
        return [e * scale for e in errors]

    def add_noise(self):
        errors = self.error_state()
        feedback = self._feedback(errors)
        for p, e, f in zip(self.params, errors, feedback):
            _check_processed_flag(p.summed_grad)
            noise = _generate_noise(std=self.noise_std, reference=p.summed_grad, generator=self.generator,
                                    secure_mode=self.secure_mode)
            p.grad = (p.summed_grad + f.view_as(p.summed_grad) + noise).view_as(p)
            raw = p.efsgd_raw_sum if p.efsgd_raw_sum is not None else torch.zeros_like(p.summed_grad)
            # e + sum g - (S + F): what the released direction has not yet paid back.
            p.efsgd_next_error = (e + (raw - p.summed_grad).view_as(p) - f).detach()
            _mark_as_processed(p.summed_grad)

    def zero_grad(self, set_to_none: bool = False):
        if not self._is_last_step_skipped:
            for p in self.params:
                p.efsgd_raw_sum = None
        super().zero_grad(set_to_none)

    def step(self, closure=None):
        if closure is not None:
            with torch.enable_grad():
                closure()
        if not self.pre_step():
            return None
        result = self.original_optimizer.step()
        for p in self.params:  # after the base step: Adam initialises only an empty state
            self.state[p][ERROR_KEY] = p.efsgd_next_error
            p.efsgd_next_error = None
        return result
