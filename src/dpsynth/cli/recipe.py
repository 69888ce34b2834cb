"""Recipes: YAML files whose sections set a stage's option defaults; flags still override.

    select-public: {sensitive: fashionmnist, public: mnist5k, sigma: 5}
    finetune: {eps: 10, epochs: 2}

Keys are option names with '-' or '_'; a section per command. Implemented with the
CLI's default map, so a recipe can only set values a user could type.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from ..errors import BadInput


def load_recipe(path: Path, commands: dict[str, dict[str, str]]) -> dict:
    """`commands`: for each command, {flag name with '_' for '-': its parameter's name}. A key that
    is not one of the section's flags is refused (a typo must not silently fall back to a default)."""
    if not path.is_file():
        raise BadInput(f"recipe {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)  # where the parser gave up, 0-based
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise BadInput(f"recipe {path} is not valid YAML{where} ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise BadInput(f"recipe {path} must be a mapping of command name -> options")
    default_map = {}
    for section, options in data.items():
        if section in ("description", "source", "sources", "notes"):
            continue
        if section not in commands:
            raise BadInput(f"recipe {path}: section {section!r} is not a command; allowed: {', '.join(sorted(commands))}")
        if not isinstance(options, dict):
            raise BadInput(f"recipe {path}: section {section!r} must be a mapping of option -> value")
        # Mappings (e.g. an --arch dict) reach the option as JSON text, as a user would type it.
        flags = commands[section]
        unknown = sorted(str(k) for k in options if str(k).replace("-", "_") not in flags)
        if unknown:
            raise BadInput(f"recipe {path}: section {section!r} has no option {unknown[0]!r}; allowed: "
                           f"{', '.join(sorted('--' + k.replace('_', '-') for k in flags))}")
        default_map[section] = {flags[str(k).replace("-", "_")]: json.dumps(v) if isinstance(v, dict) else v
                                for k, v in options.items()}
    return default_map
