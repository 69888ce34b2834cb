"""The Typer application: one thin module per command."""

import typer

from . import evaluate, finetune, generate, ledger, pretrain, select_public

app = typer.Typer(name="dpsynth", help="Differentially private image synthesis with an honest privacy ledger.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
app.command("select-public")(select_public.command)
app.command("pretrain")(pretrain.command)
app.command("finetune")(finetune.command)
app.command("generate")(generate.command)
app.command("evaluate")(evaluate.command)
app.command("ledger")(ledger.command)
