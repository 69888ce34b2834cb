"""`dpsynth methods`: every registered method, the stages it uses and its finetune settings."""

from rich.table import Table

from .common import TEXT_WIDTH, JsonOpt, emit, print_table


def describe() -> list[dict]:
    from ..methods import METHODS  # every method class: this imports torch
    from ..training.options import method_defaults

    rows = []
    for name in sorted(METHODS):
        cls = METHODS[name]
        defaults = method_defaults(cls)
        rows.append({
            "method": name, "description": cls.description,
            "select_public": cls.uses_public_selection,
            "pretrain": ("public" if cls.uses_pretraining else
                         getattr(cls, "warmup_summary", "DP central images") if cls.uses_central_warmup else None),
            "finetune": "own mechanism" if cls.own_mechanism else "DP-SGD",
            "options": sorted(k for k in defaults if k != "train_opts"),
            "train_opts": dict(defaults.get("train_opts") or {}),
        })
    return rows


def command(json_out: bool = JsonOpt) -> None:
    """List the methods `--method` accepts, what each stage does for them, and their --train-opts."""
    rows = describe()
    if json_out:
        emit({"methods": rows}, True, "")
        return
    table = Table(title="dpsynth methods")
    for col in ("method", "select-public", "pretrain", "finetune", "--train-opts (defaults)"):
        table.add_column(col, overflow="fold" if col in ("method", "--train-opts (defaults)") else "ellipsis",
                         max_width=TEXT_WIDTH if col == "--train-opts (defaults)" else None)
    for r in rows:
        opts = ", ".join(f"{k}={v}" for k, v in r["train_opts"].items()) or "—"
        table.add_row(r["method"], "yes" if r["select_public"] else "—", r["pretrain"] or "—", r["finetune"], opts)
    print_table(table)
