"""`dpsynth audit`: empirical lower bound on epsilon from a one-run canary experiment."""

import json
from pathlib import Path
from typing import Optional

import typer

from .common import JsonOpt, QuietOpt, emit, err, progress_bars

WORDING = ("statistical lower bound ({confidence:.0%} confidence) at the claimed delta, not a proof of privacy; "
           "a one-run bound far below the claimed epsilon is expected")


def command(
    eps: float = typer.Option(4.0, "--eps", help="Claimed epsilon: DP-SGD noise is calibrated to it (PRV)."),
    delta: float = typer.Option(1e-5, "--delta", help="Claimed delta."),
    canaries: int = typer.Option(1000, "--canaries", help="Dirac canaries m (each included with probability 1/2)."),
    epochs: int = typer.Option(60, "--epochs", help="DP-SGD epochs over the digits plus canaries."),
    batch_size: int = typer.Option(256, "--batch-size", help="Expected (Poisson) batch size of DP-SGD."),
    alpha: float = typer.Option(0.05, "--alpha", help="1 - confidence level of the lower bound."),
    seed: int = typer.Option(0, "--seed", help="Seed of canary inclusion, labels and training."),
    no_noise: bool = typer.Option(False, "--no-noise", help="Deliberately broken mechanism (noise off, true "
                                  "epsilon infinite) to show the audit can fail; the bound should exceed --eps."),
    noise_scale: float = typer.Option(1.0, "--noise-scale", help="Fault injection (auditing the auditor): multiply "
                                      "the DP noise by this while still claiming --eps; 0.5 is a sigma/2 bug the "
                                      "noise-scale test must catch."),
    noise_alpha: float = typer.Option(1e-3, "--noise-alpha", help="Level of the two-sided chi^2 noise-scale test "
                                      "(its false-alarm rate on a correct mechanism)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the full result (with the canary "
                                       "inclusion set) as JSON to this file."),
    quiet: bool = QuietOpt, json_out: bool = JsonOpt,
) -> None:
    """Train once on sklearn digits plus m canaries with the project's DP-SGD; bound epsilon from below.

    Exit status 0 when both hold: the lower bound stays <= the claimed epsilon, and the OUT canaries' noise
    std over the one the claimed sigma predicts lies inside the chi^2 test's interval (level --noise-alpha).
    1 when either fails, with a one-line reason: a bound above the claim refutes it at the stated confidence;
    too little noise means the mechanism is not the one accounted for (a sigma/2 bug passes the bound alone)."""
    from ..audit.one_run import AuditConfig, run_audit  # scipy/sklearn only when auditing
    from ..pipeline.rundir import atomic_write_bytes

    config = AuditConfig(claimed_epsilon=eps, delta=delta, canaries=canaries, epochs=epochs, batch_size=batch_size,
                         alpha=alpha, seed=seed, noise=not no_noise, noise_scale=noise_scale, noise_alpha=noise_alpha)
    with progress_bars(quiet or json_out, "audit") as progress:
        result = run_audit(config, progress=progress)
    record = result.to_dict()
    if out is not None:
        atomic_write_bytes(out, json.dumps(record, indent=1).encode())
    record.pop("included")
    record["note"] = WORDING.format(confidence=result.confidence)
    emit(record, json_out, "privacy audit (one run, Steinke-Nasr-Jagielski 2023)")
    if not result.passed:
        injected = ("noise was off on purpose" if no_noise else
                    f"noise scaled by {noise_scale:g} on purpose" if noise_scale != 1 else "")
        err.print(f"audit FAILED: {result.reason}" + (f" ({injected})" if injected else ""), soft_wrap=True,
                  markup=False, highlight=False)  # one line, whatever the terminal width
        raise SystemExit(1)
