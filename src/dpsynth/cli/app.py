"""The Typer application: one thin module per command. Importing it (for `--help`, an argument
error or `dpsynth ledger`) loads no torch: each command imports the library it runs inside itself."""

import os
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperCommand, TyperGroup

from . import audit, evaluate, finetune, generate, ledger, methods, pretrain, report, select_public


class _FlagsShowNoType:
    """Typer's help prints every option's type, a flag's too (`--help <bool>`, `--secure <bool>`);
    a flag takes no value, so it is shown without one."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params


class Command(_FlagsShowNoType, TyperCommand):
    pass


class Group(_FlagsShowNoType, TyperGroup):
    pass


app = typer.Typer(name="dpsynth", help="Differentially private image synthesis with an honest privacy ledger.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False, cls=Group)
for _name, _module in (("select-public", select_public), ("pretrain", pretrain), ("finetune", finetune),
                       ("generate", generate), ("evaluate", evaluate), ("ledger", ledger), ("report", report),
                       ("audit", audit), ("methods", methods)):
    app.command(_name, cls=Command)(_module.command)


@app.callback()
def main(ctx: typer.Context,
         recipe: Optional[Path] = typer.Option(os.environ.get("DPSYNTH_RECIPE"), "--recipe",
                                               help="YAML recipe whose sections set each stage's defaults "
                                                    "(flags override; default $DPSYNTH_RECIPE).")) -> None:
    """dpsynth: select-public → pretrain → finetune → generate → evaluate, one run directory."""
    if recipe:
        from .recipe import load_recipe  # yaml only when a recipe is given

        ctx.default_map = load_recipe(Path(recipe), command_flags(ctx.command))


def command_flags(group) -> dict[str, dict[str, str]]:
    """{command: {long flag without dashes, '-' as '_': parameter name}}: recipe keys are flags."""
    return {name: {opt[2:].replace("-", "_"): param.name for param in command.params for opt in param.opts
                   if opt.startswith("--")}
            for name, command in group.commands.items()}
