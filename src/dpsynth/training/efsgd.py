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

Privacy (add/remove one example z; what is released is theta_1..theta_T, post-processing
of grad_1..grad_T). We do NOT rely on DiceSGD's privacy theorem: its analysis (as its
ICLR reviews note, OpenReview) assumes per-example gradients bounded almost surely, and
sets the noise from that bound; DP's adjacency allows an added example with an arbitrarily
large gradient. The hidden state shows why subsampling cannot be credited to F_t: once z
was sampled, e_t differs between the two datasets by sum of (g_z - clip(g_z, C1)) terms,
unbounded, and the difference persists at later steps where z is NOT sampled (e -> e -
clip(e, C2) is non-expansive, not contractive). A Poisson-subsampled event with a larger
factor (e.g. sqrt(1 + 2·C2/C1)) would therefore not cover F_t
(tests/test_efsgd.py::test_feedback_is_not_covered_by_a_subsampled_event_but_is_by_ours
builds such an example and a test that beats that event's (eps, delta) bound). Instead:

  Split W_t = W1 + W2 into independent N(0, (sigma·C1)^2 I) parts; the released sum is a
  post-processing of the pair (Y1 = S_t + W1, Y2 = F_t + W2).
  * Y2 given the released past: F_t is a function of the data and the hidden past batches;
    for ANY two hidden states ||clip(e, C2) - clip(e', C2)|| <= 2·C2. Mixing over the
    (different) posteriors of the hidden state under D and D' with a product coupling,
    joint convexity of the hockey-stick divergence bounds the step by the Gaussian
    mechanism with sensitivity 2·C2: GaussianEvent(sigma·C1 / (2·C2)), T times.
  * Y1 given the released past and Y2: B_t is fresh Poisson sampling, independent of the
    hidden state, and S_t depends on the past only through the public theta_t: the usual
    Poisson-subsampled Gaussian with sensitivity C1: PoissonGaussianEvent(sigma, q, T).
  Adaptive composition of both (dominating pairs compose, Zhu, Dong, Wang 2022) gives
  the two ledger events of `efsgd_events`; noise std applied = sqrt(2)·sigma·C1 (the
  factor NOISE_FACTOR), any C2 > 0 is covered. `calibrate_efsgd_noise_multiplier`
  solves sigma so that both events fit the budget. The feedback event is not amplified
  by subsampling, so C2 must be small (about q·C1) for it to be cheap; the default is
  DEFAULT_FEEDBACK_RATIO·q·C1 (`default_feedback_clip`).

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
from ..privacy.accountant import calibrate_sigma
from ..privacy.events import GaussianEvent, PoissonGaussianEvent, PrivacyEvent

NOISE_FACTOR = math.sqrt(2.0)  # applied std = NOISE_FACTOR * sigma * C1 (two equal halves)
ERROR_KEY = "efsgd_error"
DEFAULT_FEEDBACK_RATIO = 0.5  # default C2 = ratio * q * C1


def check_feedback_clip(feedback_clip) -> float:
    if feedback_clip is None or isinstance(feedback_clip, bool) or not isinstance(feedback_clip, (int, float)) \
            or not (math.isfinite(feedback_clip) and feedback_clip > 0):
        raise BadInput(f"--feedback-clip {feedback_clip!r} must be a finite number > 0 (EFSGD's C2)")
    return float(feedback_clip)


def default_feedback_clip(clip: float, sample_rate: float) -> float:
    """C2 when none is given: the feedback event then costs about what the subsampled one does."""
    return DEFAULT_FEEDBACK_RATIO * sample_rate * clip


def applied_noise_std(noise_multiplier: float, clip: float) -> float:
    """Std of the Gaussian noise EFSGD adds to the clipped sum (before dividing by b)."""
    return NOISE_FACTOR * noise_multiplier * clip


def feedback_noise_multiplier(noise_multiplier: float, clip: float, feedback_clip: float) -> float:
    """The feedback half of the noise (std sigma·C1) relative to its sensitivity 2·C2."""
    return noise_multiplier * clip / (2.0 * check_feedback_clip(feedback_clip))


def efsgd_events(stage: str, *, noise_multiplier: float, sample_rate: float, steps: int, clip: float,
                 feedback_clip: float) -> list[PrivacyEvent]:
    """The two ledger events of T EFSGD steps (module docstring). The PoissonGaussianEvent
    comes last, so it is the stage's last event (what `--resume` looks for)."""
    std = applied_noise_std(noise_multiplier, clip)
    fb = feedback_noise_multiplier(noise_multiplier, clip, feedback_clip)
    common = f"EFSGD C1={clip:g} C2={feedback_clip:g} applied noise std {std:.6g} on the sum"
    return [GaussianEvent(stage=stage, noise_multiplier=fb, steps=steps,
                          note=f"{common}; error-feedback half: sensitivity 2*C2, std sigma*C1, not subsampled"),
            PoissonGaussianEvent(stage=stage, noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                                 steps=steps, note=f"{common}; clipped-gradient half: sensitivity C1, std sigma*C1")]


def calibrate_efsgd_noise_multiplier(spent: Sequence[PrivacyEvent], target_epsilon: float, delta: float, *,
                                     sample_rate: float, steps: int, clip: float, feedback_clip: float,
                                     stage: str = "finetune", sigma_min: float = 0.4, sigma_max: float = 500.0,
                                     rel_tol: float = 2e-3) -> float:
    """Smallest sigma (to rel_tol) with PRV upper bound of spent + efsgd_events <= target.
    Both events' noise grows with sigma, so epsilon decreases monotonically: bisection."""
    check_feedback_clip(feedback_clip)
    return calibrate_sigma(
        spent, target_epsilon, delta,
        lambda sigma: efsgd_events(stage, noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, clip=clip,
                                   feedback_clip=feedback_clip),
        sigma_min=sigma_min, sigma_max=sigma_max, rel_tol=rel_tol,
        too_little=f"for {steps} EFSGD steps (its error feedback is not subsampled)",
        advice="use a smaller --feedback-clip, fewer epochs or a larger --eps")


class EFSGDOptimizer(DPOptimizer):
    """opacus DPOptimizer with DiceSGD's clipped error feedback (module docstring).

    noise_multiplier is the sigma of `efsgd_events` (the caller records those events);
    the noise added to the clipped sum has std NOISE_FACTOR·sigma·max_grad_norm.
    Virtual steps (signal_skip_step), empty Poisson batches and step hooks work as in
    DPOptimizer: the unclipped per-example sum is accumulated next to opacus' clipped one.
    """

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
