"""Library messages name parameters (`batch_size=0`, `` `eps` ``); this maps them to the
invoked command's flags (`--batch-size 0`, `--eps`), so flag names live in the CLI only."""

from __future__ import annotations

import re

import typer

_ASSIGNED = re.compile(r"(?<![\w.-])([a-z][a-z0-9_]*)=")
_QUOTED = re.compile(r"`([a-z][a-z0-9_]*)`")


def command_flags(app: typer.Typer, argv: list[str]) -> dict[str, str]:
    """{parameter name: its long flag} for the subcommand named in argv (empty if none)."""
    group = typer.main.get_command(app)
    name = next((a for a in argv if not a.startswith("-")), None)
    command = getattr(group, "commands", {}).get(name) if name else None
    if command is None:
        return {}
    flags = {}
    for param in command.params:
        long = [opt for opt in param.opts if opt.startswith("--")]
        if long and param.name:
            flags[param.name] = long[0]
    return flags


def to_flags(message: str, flags: dict[str, str]) -> str:
    def assigned(match: re.Match) -> str:
        flag = flags.get(match.group(1))
        return f"{flag} " if flag else match.group(0)

    def quoted(match: re.Match) -> str:
        return flags.get(match.group(1), match.group(1))

    return _QUOTED.sub(quoted, _ASSIGNED.sub(assigned, message))
