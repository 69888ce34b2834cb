"""The one-run canary experiment, on the project's own DP-SGD (`train_dp`, opacus, PRV).

Setup (research note `privacy-audit.md`, section 4): sklearn's 8x8 digits plus m Dirac
canaries. Canary i is the input 100*e_i in a block of m extra input dimensions, with a
random label; a bias-free linear model reads [x_real | x_canary]. Each canary's gradient
therefore lives only in its own column of the canary weights, which real images never
touch, so the column's final value is "canary gradient if sampled + Gaussian noise".
Each canary is included with probability 1/2 (seeded, stored in the result), the model is
trained ONCE with DP-SGD at the noise multiplier the accountant calibrates for the claimed
(eps, delta), and the guesser ranks canaries by the logit margin of their input.

The verdict needs both: the one-run lower bound at or below the claim, and the OUT canaries'
noise at the scale the claimed sigma predicts (`noise.noise_scale_test`). The bound alone
misses a mechanism with half the noise (research note, section 0 and row (d)).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from ..errors import BadInput
from ..privacy.accountant import compose_epsilon
from ..privacy.plans import calibrate_private_optimizer
from ..privacy.events import PoissonGaussianEvent
from ..progress import no_progress
from ..training.dpsgd import DPSGDPlan, train_dp
from ..training.options import FinetuneOptions
from .bound import best_guess, default_ks, one_run_p_value
from .noise import NOISE_TEST_ALPHA, noise_scale_test

CANARY_SCALE = 100.0  # canary input magnitude: its gradient stays clipped to exactly C until it is fit
NUM_CLASSES = 10


@dataclass(frozen=True)
class AuditConfig:
    claimed_epsilon: float = 4.0
    delta: float = 1e-5
    canaries: int = 1000
    epochs: int = 60
    batch_size: int = 256
    clip: float = 1.0
    lr: float = 0.05  # small, so noise does not saturate the canary logits (the note's canary lr)
    alpha: float = 0.05
    seed: int = 0
    noise: bool = True  # False = the deliberately broken mechanism (no noise; true eps is infinite)
    # Fault injection for auditing the auditor: the mechanism's noise is multiplied by this while
    # the claim stays the one calibrated for the full noise (0.5 = a sigma/2 bug).
    noise_scale: float = 1.0
    noise_alpha: float = NOISE_TEST_ALPHA  # false-alarm rate of the noise-scale test

    def __post_init__(self) -> None:
        if not (math.isfinite(self.claimed_epsilon) and self.claimed_epsilon > 0):
            raise BadInput(f"eps={self.claimed_epsilon!r} is not allowed; it must be a finite number > 0")
        if not (0 < self.delta < 1):
            raise BadInput(f"delta={self.delta!r} is not allowed; it must be in (0, 1)")
        if self.canaries < 10:
            raise BadInput(f"canaries={self.canaries} is not allowed; it must be >= 10 (>= 1000 for a useful bound)")
        if self.epochs < 1:
            raise BadInput(f"epochs={self.epochs} is not allowed; it must be >= 1")
        if not (0 < self.alpha < 1):
            raise BadInput(f"alpha={self.alpha!r} is not allowed; it must be in (0, 1)")
        if not (math.isfinite(self.noise_scale) and self.noise_scale > 0):
            raise BadInput(f"noise_scale={self.noise_scale!r} is not allowed; it must be a finite number > 0 "
                           "(`no_noise` turns the noise off)")
        if not (0 < self.noise_alpha < 1):
            raise BadInput(f"noise_alpha={self.noise_alpha!r} is not allowed; it must be in (0, 1)")


@dataclass
class AuditResult:
    claimed_epsilon: float
    delta: float
    confidence: float
    noise_multiplier: float    # calibrated for the claim (the applied one is noise_scale times it, or 0)
    sample_rate: float
    steps: int
    canaries: int
    guesses: int
    correct: int
    guesses_per_side: int
    epsilon_lower_bound: float
    p_value_at_claim: float
    passed: bool               # the verdict: bound_passed and noise_passed
    bound_passed: bool         # lower bound <= claimed epsilon
    noise_passed: bool         # noise_std_ratio inside noise_ratio_interval
    noise_std_ratio: float     # measured (ddof=1) / predicted std of OUT-canary scores (1.0 expected)
    noise_ratio_interval: list  # [low, high]: the chi^2 test's acceptance interval for the ratio
    out_canaries: int          # OUT canaries behind the ratio
    noise_alpha: float         # the noise test's level (its false-alarm rate on a correct run)
    reason: str                # why the verdict failed, one line; "" when it passed
    test_accuracy: float
    seconds: float
    seed: int
    noise: bool
    noise_scale: float
    included: list = field(repr=False, default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class CanaryLinear(nn.Module):
    """Bias-free linear classifier on [x_real | x_canary], zero-initialised."""

    def __init__(self, real_dim: int, canaries: int):
        super().__init__()
        self.real_dim = real_dim
        self.real = nn.Linear(real_dim, NUM_CLASSES, bias=False)
        self.canary = nn.Linear(canaries, NUM_CLASSES, bias=False)
        nn.init.zeros_(self.real.weight)
        nn.init.zeros_(self.canary.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.real(x[:, :self.real_dim]) + self.canary(x[:, self.real_dim:])

    def canary_logits(self) -> torch.Tensor:
        """Logits of each canary's input (what a black-box query returns), shape (m, classes)."""
        return (CANARY_SCALE * self.canary.weight).T.detach()


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def _digits(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    test, train = order[:300], order[300:]
    return x[train], y[train], x[test], y[test]


def run_audit(config: AuditConfig, progress=None) -> AuditResult:
    start = time.perf_counter()
    m = config.canaries
    rng = np.random.default_rng(config.seed)
    included = rng.random(m) < 0.5
    if (~included).sum() < 2:  # checked before the training it would waste
        raise BadInput(f"canaries={m} with seed={config.seed} left {(~included).sum()} OUT canaries; the "
                       "noise-scale test needs >= 2 (use more canaries)")
    canary_labels = torch.tensor(rng.integers(0, NUM_CLASSES, m), dtype=torch.long)
    x_train, y_train, x_test, y_test = _digits(config.seed)
    real_dim = x_train.shape[1]

    inside = np.flatnonzero(included)
    canary_x = torch.zeros(len(inside), real_dim + m)
    canary_x[torch.arange(len(inside)), real_dim + torch.tensor(inside)] = CANARY_SCALE
    images = torch.cat([torch.cat([x_train, torch.zeros(len(x_train), m)], 1), canary_x])
    labels = torch.cat([y_train, canary_labels[torch.tensor(inside, dtype=torch.long)]])

    # Canaries count as records: q and the calibration see the dataset they are part of.
    plan = DPSGDPlan(dataset_size=len(images), batch_size=config.batch_size, epochs=config.epochs)
    sigma = calibrate_private_optimizer("dpsgd", [], config.claimed_epsilon, config.delta,
                                        sample_rate=plan.sample_rate, steps=plan.steps, stage="audit")
    claimed = compose_epsilon([PoissonGaussianEvent("audit", sigma, plan.sample_rate, plan.steps)], config.delta)
    torch.manual_seed(config.seed)
    model = CanaryLinear(real_dim, m)
    applied = sigma * config.noise_scale if config.noise else 0.0  # != sigma only when faults are injected
    trained = train_dp(model, images, labels, _loss, plan=plan, noise_multiplier=applied,
                       opts=FinetuneOptions(clip=config.clip, lr=config.lr, grad_sample_mode="hooks",
                                            base_optimizer="sgd"),
                       progress=progress or no_progress, phase="audit (DP-SGD)")

    logits = trained.canary_logits()
    own = logits[torch.arange(m), canary_labels]
    others = (logits.sum(1) - own) / (NUM_CLASSES - 1)
    scores = (own - others).numpy().astype(np.float64)
    guess = best_guess(scores, included, default_ks(m), config.delta, config.alpha)

    # White-box noise-scale check: an OUT canary's score is pure noise with this std under the
    # claimed sigma. opacus divides the noisy sum by the expected batch size q*N; the margin's
    # own-minus-mean-of-9-others adds the factor sqrt(1 + 1/9).
    step_std = CANARY_SCALE * config.lr * sigma * config.clip / (plan.sample_rate * plan.dataset_size)
    predicted = step_std * math.sqrt(plan.steps) * math.sqrt(1 + 1 / (NUM_CLASSES - 1))
    noise_test = noise_scale_test(scores[~included], predicted, config.noise_alpha)
    with torch.no_grad():
        accuracy = float((trained(torch.cat([x_test, torch.zeros(len(x_test), m)], 1)).argmax(1) == y_test)
                         .float().mean())
    p_at_claim = one_run_p_value(claimed.upper, config.delta, m, guess.r, guess.v) * len(default_ks(m))
    bound_passed = guess.epsilon_lb <= claimed.upper
    reasons = [] if bound_passed else [f"lower bound {guess.epsilon_lb:.3f} > claimed epsilon {claimed.upper:.3f} "
                                       f"({1 - config.alpha:.0%} confidence)"]
    reasons += [noise_test.reason()] if not noise_test.passed else []
    return AuditResult(
        claimed_epsilon=claimed.upper, delta=config.delta, confidence=1 - config.alpha, noise_multiplier=sigma,
        sample_rate=plan.sample_rate, steps=plan.steps, canaries=m, guesses=guess.r, correct=guess.v,
        guesses_per_side=guess.k, epsilon_lower_bound=guess.epsilon_lb, p_value_at_claim=min(1.0, p_at_claim),
        passed=bound_passed and noise_test.passed, bound_passed=bound_passed, noise_passed=noise_test.passed,
        noise_std_ratio=noise_test.ratio, noise_ratio_interval=[noise_test.low, noise_test.high],
        out_canaries=noise_test.n, noise_alpha=config.noise_alpha, reason="; ".join(reasons),
        test_accuracy=accuracy, seconds=time.perf_counter() - start, seed=config.seed, noise=config.noise,
        noise_scale=config.noise_scale,
        included=[int(i) for i in inside])
