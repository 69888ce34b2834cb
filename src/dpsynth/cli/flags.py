"""Library messages name parameters (`batch_size=0`, `` `eps` ``); this maps them to the
invoked command's flags (`--batch-size 0`, `--eps`), so flag names live in the CLI only.

`name=VALUE` maps only when the invoked command has that parameter (it is the value given).
A backticked `` `name` `` is a hint ("create the run with `holdout`"): it maps to the invoked
command's flag, else to the flag of that parameter in any other command (`evaluate` can say
`--holdout`, which only the run-creating commands take)."""

from __future__ import annotations

import os

import re

import typer

# {parameter: flag} over every command, set by cli.main before a command runs (tables map result text with it).
HINTS: dict[str, str] = {}
# The arguments of the command being run, as given (set by cli.main; `finetune --nproc` relaunches them).
INVOKED: list[str] = []

_ASSIGNED = re.compile(r"(?<![\w.-])([a-z][a-z0-9_]*)=")
_QUOTED = re.compile(r"`([a-z][a-z0-9_]*)`")


def _long_flags(command) -> dict[str, str]:
    flags = {}
    for param in getattr(command, "params", ()):
        long = [opt for opt in param.opts if opt.startswith("--")]
        if long and param.name:
            flags[param.name] = long[0]
    return flags


def command_flags(app: typer.Typer, argv: list[str]) -> dict[str, str]:
    """{parameter name: its long flag} for the subcommand named in argv (empty if none)."""
    group = typer.main.get_command(app)
    name = next((a for a in argv if not a.startswith("-")), None)
    command = getattr(group, "commands", {}).get(name) if name else None
    return _long_flags(command) if command is not None else {}


def all_flags(app: typer.Typer) -> dict[str, str]:
    """{parameter name: its long flag} over every subcommand (the first spelling wins)."""
    flags: dict[str, str] = {}
    for command in getattr(typer.main.get_command(app), "commands", {}).values():
        for name, flag in _long_flags(command).items():
            flags.setdefault(name, flag)
    return flags


def to_flags(message: str, flags: dict[str, str], hints: dict[str, str] | None = None) -> str:
    """`flags`: the invoked command's; `hints`: any command's, used for backticked names only."""
    hints = {**(hints or {}), **flags}

    def assigned(match: re.Match) -> str:
        flag = flags.get(match.group(1))
        return f"{flag} " if flag else match.group(0)

    def quoted(match: re.Match) -> str:
        return hints.get(match.group(1), match.group(1))

    return _QUOTED.sub(quoted, _ASSIGNED.sub(assigned, message))


def torchrun_follower() -> bool:
    """A rank other than 0 of a torchrun launch (from its environment: no torch import here)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("RANK", "0") != "0"
