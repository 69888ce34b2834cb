"""Empirical privacy audit across seeds: the one-run lower bound beside the claimed epsilon.

For each seed, trains once with the project's DP-SGD (calibrated to --eps) per --noise-scales
value (fault injection: 0.5 halves the noise, the claim stays) and, with --broken, once more with
noise off; prints one row per run: the bound, the noise-scale test (S/s inside its chi^2
interval), the verdict and the seconds each took.

    python benchmarks/audit.py [--eps 4] [--canaries 1000] [--epochs 60] [--seeds 0 1 2] [--noise-scales 1 0.5] [--broken]
"""

from __future__ import annotations

import argparse
import warnings

import pandas as pd

from dpsynth.audit.one_run import AuditConfig, run_audit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eps", type=float, default=4.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--noise-scales", type=float, nargs="+", default=[1.0],
                        help="noise multipliers applied to the calibrated sigma (1 = correct, 0.5 = sigma/2 bug)")
    parser.add_argument("--broken", action="store_true", help="also run the noise-off configuration")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    rows = []
    for seed in args.seeds:
        for noise, scale in [(True, s) for s in args.noise_scales] + ([(False, 1.0)] if args.broken else []):
            result = run_audit(AuditConfig(claimed_epsilon=args.eps, delta=args.delta, canaries=args.canaries,
                                           epochs=args.epochs, seed=seed, noise=noise, noise_scale=scale))
            lo, hi = result.noise_ratio_interval
            rows.append({"seed": seed, "noise": "OFF (broken)" if not noise else "on" if scale == 1 else f"x{scale:g}",
                         "sigma": round(result.noise_multiplier * scale, 4) if noise else 0.0,
                         "claimed_eps": round(result.claimed_epsilon, 3),
                         "eps_lb_95": round(result.epsilon_lower_bound, 3),
                         "correct/guesses": f"{result.correct}/{result.guesses}", "bound_ok": result.bound_passed,
                         "noise_std_ratio": round(result.noise_std_ratio, 3),
                         "ratio_interval": f"[{lo:.3f}, {hi:.3f}] n={result.out_canaries}",
                         "noise_ok": result.noise_passed, "passed": result.passed,
                         "test_acc": round(result.test_accuracy, 3), "seconds": round(result.seconds, 1)})
            print(pd.DataFrame(rows[-1:]).to_string(index=False, header=len(rows) == 1), flush=True)
    print()
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
