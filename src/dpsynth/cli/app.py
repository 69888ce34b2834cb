"""The Typer application: one thin module per command."""

import os
from pathlib import Path
from typing import Optional

import typer

from . import audit, evaluate, finetune, generate, ledger, methods, pretrain, report, select_public
from .recipe import load_recipe

app = typer.Typer(name="dpsynth", help="Differentially private image synthesis with an honest privacy ledger.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
app.command("select-public")(select_public.command)
app.command("pretrain")(pretrain.command)
app.command("finetune")(finetune.command)
app.command("generate")(generate.command)
app.command("evaluate")(evaluate.command)
app.command("ledger")(ledger.command)
app.command("report")(report.command)
app.command("audit")(audit.command)
app.command("methods")(methods.command)



@app.callback()
def main(ctx: typer.Context,
         recipe: Optional[Path] = typer.Option(os.environ.get("DPSYNTH_RECIPE"), "--recipe",
                                               help="YAML recipe whose sections set each stage's defaults "
                                                    "(flags override; default $DPSYNTH_RECIPE).")) -> None:
    """dpsynth: select-public → pretrain → finetune → generate → evaluate, one run directory."""
    if recipe:
        ctx.default_map = load_recipe(Path(recipe), command_flags(ctx.command))


def command_flags(group) -> dict[str, dict[str, str]]:
    """{command: {long flag without dashes, '-' as '_': parameter name}}: recipe keys are flags."""
    return {name: {opt[2:].replace("-", "_"): param.name for param in command.params for opt in param.opts
                   if opt.startswith("--")}
            for name, command in group.commands.items()}
