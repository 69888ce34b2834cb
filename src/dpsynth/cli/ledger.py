"""`dpsynth ledger`: the run's privacy events and their composed epsilon (recomputed)."""

import typer
from rich.table import Table

from .common import JsonOpt, RunOpt, emit, out, print_table


def command(run: str = RunOpt, json_out: bool = JsonOpt,
            rdp: bool = typer.Option(False, "--rdp", help="Also show the (looser) RDP epsilon.")) -> None:
    """Print every privacy event and the PRV upper bound of their composition at the run's delta."""
    from ..pipeline.rundir import RunDir
    from ..privacy.accountant import compose_epsilon, rdp_epsilon  # torch-free (prv-accountant, SciPy)

    run_dir = RunDir.open(run)
    events = run_dir.events()
    bounds = compose_epsilon(events, run_dir.delta)
    result = {"run": run, "delta": run_dir.delta, "epsilon": bounds.upper, "epsilon_estimate": bounds.estimate,
              "accountant": bounds.accountant, "target_epsilon": run_dir.manifest["privacy"].get("target_epsilon"),
              "events": run_dir.manifest["privacy"]["events"],
              "assumptions": run_dir.manifest["privacy"].get("assumptions") or {}}
    if rdp:
        result["epsilon_rdp"] = rdp_epsilon(events, run_dir.delta)
    if json_out:
        emit(result, True, "")
        return
    table = Table(title=f"privacy ledger of {run} (delta={run_dir.delta:.3g})")
    for col in ("#", "stage", "mechanism", "noise_multiplier", "sample_rate", "steps", "epsilon after"):
        table.add_column(col, overflow="fold" if col in ("stage", "mechanism") else "ellipsis")
    for i, ev in enumerate(result["events"], 1):
        table.add_row(str(i), ev["stage"], ev["mechanism"], f"{ev.get('noise_multiplier', ev.get('epsilon0', '')):.4g}",
                      _rate(ev), str(ev.get("steps", 1)), f"{ev.get('epsilon_after', float('nan')):.4g}")
    print_table(table)
    line = (f"epsilon = {bounds.upper:.4f} (PRV upper bound; estimate {bounds.estimate:.4f})" if bounds.accountant == "prv"
            else f"epsilon = {bounds.upper:.4f} (RDP bound: PRV discretisation failed for these events)")
    if rdp:
        line += f"; RDP cross-check {result['epsilon_rdp']:.4f}"
    out.print(line)
    for name, text in result["assumptions"].items():
        out.print(f"assumes ({name.replace('_', ' ')}): {text}", soft_wrap=True)


def _rate(ev: dict) -> str:
    # A shard_gaussian event is not subsampled: its image's steps are all charged, so no rate is shown.
    if "shards" in ev:
        return f"shard 1/{ev['shards']}"
    return f"{ev.get('sample_rate', 1.0):.4g}"
