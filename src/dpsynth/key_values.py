"""Text options of the form `--arch` and `--train-opts` take: JSON, or k=v pairs."""

from __future__ import annotations

import json
from typing import Any

from .errors import BadInput


def parse_arch(text: str | dict | None, flag: str = "`arch`") -> dict:
    """--arch as JSON ('{"width": 16, "ch_mult": [2, 2]}') or k=v pairs ('width=16,ch_mult=2:2')."""
    if text is None or isinstance(text, dict):
        return dict(text or {})
    text = text.strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadInput(f"{flag} {text!r} is not valid JSON ({exc.msg})") from None
        if not isinstance(value, dict):
            raise BadInput(f"{flag} {text!r} must be a JSON object")
        return value
    arch = {}
    for item in text.split(","):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise BadInput(f"{flag} item {item!r} must look like key=value (e.g. width=16,ch_mult=2:2)")
        arch[key.strip()] = _scalar_or_list(raw.strip())
    return arch


def _scalar_or_list(raw: str) -> Any:
    if ":" in raw:
        return [_scalar_or_list(part) for part in raw.split(":")]
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw
