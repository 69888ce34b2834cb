"""Privacy plans of the iterative mechanisms: which ledger events T steps of each make, and
the noise that fits a budget. Pure arithmetic on public quantities (N, batch size, epochs,
clipping norms): no torch, so planning never needs the training stack.

DP-SGD (opacus' DPOptimizer): one PoissonGaussianEvent(sigma, q, T).

GS-WGAN: one ShardGaussianEvent(sigma, N_d, T) (its argument: methods/gan/gs_wgan.py).

EFSGD (DP-SGD with clipped error feedback, DiceSGD; `training.efsgd` runs it). In opacus'
"sum" units, with S_t the clipped sum and F_t = clip(e_t, C2) the error feedback, it
releases (S_t + F_t + W_t) / b with W_t ~ N(0, (sqrt(2)*sigma*C1)^2 I).

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from ..errors import BadInput
from ..validation import check_choice, check_positive
from .accountant import epsilon_upper, rdp_epsilon
from .calibration import calibrate_sigma
from .events import GaussianEvent, PoissonGaussianEvent, PrivacyEvent, ShardGaussianEvent

PRIVATE_OPTIMIZERS = ("dpsgd", "efsgd")
# grad_sample_modes that never form each example's gradient (they clip norms computed from
# activations and leave the clipped sum): EFSGD's error feedback needs the gradients themselves.
CLIPPED_SUM_MODES = ("bk", "ghost")
NOISE_FACTOR = math.sqrt(2.0)  # EFSGD's applied std = NOISE_FACTOR * sigma * C1 (two equal halves)
DEFAULT_FEEDBACK_RATIO = 0.5  # EFSGD's default C2 = ratio * q * C1


@dataclass(frozen=True)
class DPSGDPlan:
    """The sampling schedule the ledger event will state; computed before any sensitive data is touched.
    `dataset_size` is the declared N (the true size unless the run declared another)."""

    dataset_size: int
    batch_size: int
    epochs: int

    def __post_init__(self) -> None:
        if self.dataset_size < 1:
            raise BadInput(f"sensitive dataset is empty (size {self.dataset_size})")
        if not (1 <= self.batch_size <= self.dataset_size):
            raise BadInput(f"batch_size={self.batch_size} must be between 1 and the dataset size {self.dataset_size}")
        check_positive("epochs", self.epochs, integer=True)

    @property
    def steps_per_epoch(self) -> int:
        return max(1, round(self.dataset_size / self.batch_size))

    @property
    def sample_rate(self) -> float:
        # the Poisson batches (training.distributed.PoissonBatches) are round(1/q) per epoch; we
        # pick q so that expected batch = batch_size and the steps taken are what we count.
        return 1.0 / self.steps_per_epoch

    @property
    def steps(self) -> int:
        return self.epochs * self.steps_per_epoch


def check_private_optimizer(kind: str, grad_sample_mode: str | None = None, feedback_clip: float | None = None) -> None:
    check_choice("optimizer", kind, PRIVATE_OPTIMIZERS)
    if kind == "dpsgd" and feedback_clip is not None:
        raise BadInput("`feedback_clip` is a setting of optimizer=efsgd; drop it or use optimizer=efsgd")
    if kind == "efsgd" and grad_sample_mode in CLIPPED_SUM_MODES:
        raise BadInput("optimizer=efsgd needs each example's gradient (its error state is the unclipped mean); "
                       "use grad_sample_mode=vmap, hooks or functorch")


def check_feedback_clip(feedback_clip) -> float:
    check_positive("feedback_clip", feedback_clip)
    return float(feedback_clip)


def default_feedback_clip(clip: float, sample_rate: float) -> float:
    """EFSGD's C2 when none is given: the feedback event then costs about what the subsampled one does."""
    return DEFAULT_FEEDBACK_RATIO * sample_rate * clip


def resolve_feedback_clip(kind: str, feedback_clip: float | None, *, clip: float, sample_rate: float) -> float | None:
    """EFSGD's C2 (its default when not given); None for dpsgd."""
    check_private_optimizer(kind, feedback_clip=feedback_clip)
    if kind != "efsgd":
        return None
    return check_feedback_clip(default_feedback_clip(clip, sample_rate) if feedback_clip is None else feedback_clip)


def applied_noise_std(noise_multiplier: float, clip: float) -> float:
    """Std of the Gaussian noise EFSGD adds to the clipped sum (before dividing by b)."""
    return NOISE_FACTOR * noise_multiplier * clip


def feedback_noise_multiplier(noise_multiplier: float, clip: float, feedback_clip: float) -> float:
    """EFSGD's feedback half of the noise (std sigma*C1) relative to its sensitivity 2*C2."""
    return noise_multiplier * clip / (2.0 * check_feedback_clip(feedback_clip))


def private_optimizer_events(kind: str, stage: str, *, noise_multiplier: float, sample_rate: float, steps: int,
                             clip: float, feedback_clip: float | None = None) -> list[PrivacyEvent]:
    """Every ledger event of `steps` steps of this optimizer; the PoissonGaussianEvent comes last
    (it is the stage's last event, what `--resume` looks for)."""
    check_private_optimizer(kind, feedback_clip=feedback_clip)
    if kind == "dpsgd":
        return [PoissonGaussianEvent(stage=stage, noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                                     steps=steps)]
    std = applied_noise_std(noise_multiplier, clip)
    fb = feedback_noise_multiplier(noise_multiplier, clip, feedback_clip)
    common = f"EFSGD C1={clip:g} C2={feedback_clip:g} applied noise std {std:.6g} on the sum"
    return [GaussianEvent(stage=stage, noise_multiplier=fb, steps=steps,
                          note=f"{common}; error-feedback half: sensitivity 2*C2, std sigma*C1, not subsampled"),
            PoissonGaussianEvent(stage=stage, noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                                 steps=steps, note=f"{common}; clipped-gradient half: sensitivity C1, std sigma*C1")]


def calibrate_private_optimizer(kind: str, spent: Sequence[PrivacyEvent], target_epsilon: float, delta: float, *,
                                sample_rate: float, steps: int, clip: float = 1.0, feedback_clip: float | None = None,
                                stage: str = "finetune") -> float:
    """Smallest noise multiplier such that spent + private_optimizer_events(...) fit the target."""
    check_private_optimizer(kind, feedback_clip=feedback_clip)
    if kind == "efsgd":
        check_feedback_clip(feedback_clip)
        what, advice = (f"its {steps} EFSGD steps (error feedback not subsampled)",
                              "use a smaller `feedback_clip`, fewer `epochs` or a larger `eps`")
    else:
        what, advice = (f"its {steps} steps at sample rate {sample_rate:.4g}",
                              "use fewer `epochs`, a smaller `batch_size`, or a larger `eps`")
    return calibrate_sigma(
        spent, target_epsilon, delta,
        lambda sigma: private_optimizer_events(kind, stage, noise_multiplier=sigma, sample_rate=sample_rate,
                                               steps=steps, clip=clip, feedback_clip=feedback_clip),
        sigma_min=0.4, sigma_max=500.0 if kind == "efsgd" else 200.0, what=what, advice=advice)


def gaussian_release_sigma(spent: Sequence[PrivacyEvent], target_epsilon: float, delta: float, *, stage: str,
                           note: str = "", param: str = "eps", given: float | None = None,
                           what: str = "its Gaussian release") -> float:
    """Noise multiplier of one full-data Gaussian release so the ledger stays <= target
    (`param`/`given`: the parameter that set the target, as in `calibrate_sigma`)."""
    return calibrate_sigma(spent, target_epsilon, delta,
                           lambda sigma: [GaussianEvent(stage=stage, noise_multiplier=sigma, note=note)],
                           sigma_min=0.05, sigma_max=200.0, param=param, given=given, what=what)


def calibrate_shard_gaussian(spent: Sequence[PrivacyEvent], target_epsilon: float, delta: float, *,
                             shards: int, steps: int, stage: str = "finetune", rel_tol: float = 2e-3) -> float:
    """Smallest noise multiplier (to rel_tol) of ShardGaussianEvent(sigma, shards, steps) keeping
    the PRV upper bound of the ledger <= target_epsilon.

    The PRV grid grows with epsilon (~1000s at sigma ~ 0.1), so a blind bracket costs minutes:
    the bracket is taken around the sigma at which the (cheap, analytic, looser) RDP bound meets
    the target, and only the PRV decides."""
    def events_at(sigma: float) -> list[PrivacyEvent]:
        return [ShardGaussianEvent(stage, sigma, shards, steps)]

    lo, hi = 0.1, 2000.0
    try:
        if rdp_epsilon([*spent, *events_at(hi)], delta) <= target_epsilon:
            while hi / lo > 1.01:  # bisection on the RDP bound, which decreases in sigma
                mid = math.sqrt(lo * hi)
                lo, hi = (lo, mid) if rdp_epsilon([*spent, *events_at(mid)], delta) <= target_epsilon else (mid, hi)
            lo, hi = hi / 2.0, hi * 1.5  # PRV's sigma is below RDP's (RDP over-counts), rarely by 2x
    except (BadInput, ValueError, FloatingPointError, OverflowError):
        lo, hi = 0.1, 2000.0  # RDP did not help: the blind bracket is slow but still exact
    if epsilon_upper([*spent, *events_at(hi)], delta) > target_epsilon:
        hi = 2000.0  # never refuse for the bracket's sake; calibrate_sigma says if even this fails
    while lo > 0.1 and epsilon_upper([*spent, *events_at(lo)], delta) <= target_epsilon:
        lo, hi = lo / 2.0, lo  # keep the bracket's low end infeasible, so the result is the smallest sigma
    return calibrate_sigma(spent, target_epsilon, delta, events_at, sigma_min=lo, sigma_max=hi, rel_tol=rel_tol,
                           what=f"its {steps} steps over {shards} shards",
                           advice="use fewer `iterations`, more `discriminators`, or a larger `eps`")
