"""White-box noise-scale test: do the OUT canaries carry the noise the claimed sigma implies?

An OUT canary's column of the canary weights is touched only by DP noise, so its score is
exactly N(0, s^2) with s = the std the claimed noise multiplier predicts, independently
across canaries. With n OUT scores and S their sample std (ddof=1), (n-1) S^2 / s^2 follows
chi^2 with n-1 degrees of freedom under the claim. The two-sided test at level alpha accepts

    S / s in [sqrt(chi2_{alpha/2, n-1} / (n-1)),  sqrt(chi2_{1-alpha/2, n-1} / (n-1))].

Below the interval the mechanism adds less noise than its epsilon was accounted for (the
privacy failure: a sigma/2 bug gives S/s = 0.5, which the one-run epsilon bound misses).
Above it the audit's noise model does not describe the mechanism, so its bound means nothing
either. A correct run falls outside with probability alpha exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import chi2

from ..errors import BadInput

NOISE_TEST_ALPHA = 1e-3  # false-alarm rate of the noise-scale test on a correct mechanism


def noise_ratio_interval(n: int, alpha: float = NOISE_TEST_ALPHA) -> tuple[float, float]:
    """Acceptance interval of S/s for n i.i.d. Gaussian scores (two-sided chi^2 test at level alpha)."""
    if not (isinstance(n, (int, np.integer)) and n >= 2):
        raise BadInput(f"the noise-scale test needs n >= 2 OUT-canary scores; got n={n!r}")
    if not (0 < alpha < 1):
        raise BadInput(f"noise_alpha={alpha!r} must be in (0, 1)")
    dof = int(n) - 1
    return (math.sqrt(chi2.ppf(alpha / 2, dof) / dof), math.sqrt(chi2.isf(alpha / 2, dof) / dof))


def noise_ratio_power(ratio: float, n: int, alpha: float = NOISE_TEST_ALPHA) -> float:
    """Probability that the test rejects when the true std is `ratio` times the predicted one."""
    lo, hi = noise_ratio_interval(n, alpha)
    dof = n - 1
    if ratio <= 0:
        return 1.0
    scale = dof / ratio ** 2  # (n-1) S^2 / s^2 = ratio^2 * chi2_{n-1}
    return float(chi2.cdf(lo ** 2 * scale, dof) + chi2.sf(hi ** 2 * scale, dof))


@dataclass(frozen=True)
class NoiseTest:
    ratio: float   # measured / predicted std of the OUT-canary scores
    low: float
    high: float
    n: int         # OUT canaries
    alpha: float

    @property
    def passed(self) -> bool:
        return self.low <= self.ratio <= self.high

    def reason(self) -> str:
        """Why the test failed, in one line ('' when it passed)."""
        where = (f"OUT-canary std is {self.ratio:.3f} of the claimed noise's, outside [{self.low:.3f}, "
                 f"{self.high:.3f}] (chi^2 test, {self.n} OUT canaries, alpha={self.alpha:g})")
        if self.ratio < self.low:
            return f"noise too small: {where}: the mechanism adds less noise than its epsilon assumes"
        if self.ratio > self.high:
            return f"noise too large: {where}: the audit's noise model does not match the mechanism"
        return ""


def noise_scale_test(out_scores: np.ndarray, predicted_std: float, alpha: float = NOISE_TEST_ALPHA) -> NoiseTest:
    """The two-sided chi^2 test of the OUT-canary scores' std against the predicted one."""
    out_scores = np.asarray(out_scores, dtype=np.float64)
    if not (math.isfinite(predicted_std) and predicted_std > 0):
        raise BadInput(f"predicted_std={predicted_std!r} must be a finite number > 0")
    low, high = noise_ratio_interval(len(out_scores), alpha)
    ratio = float(np.std(out_scores, ddof=1)) / predicted_std
    return NoiseTest(ratio=ratio, low=low, high=high, n=len(out_scores), alpha=alpha)
