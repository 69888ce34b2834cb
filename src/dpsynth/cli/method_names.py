"""The registered methods' names, read from the methods package's source instead of importing it
(every method module imports torch, and `--method`'s help is built at start-up). Each method class
sets `name = "..."` in its body and its module calls `register_method`, as docs/ADDING.md shows; a
test checks this list against the registry itself. (A regular expression, not `ast`: parsing the
package costs ~60 ms of every start-up, the expression well under 1 ms.)"""

from __future__ import annotations

import functools
import re
from pathlib import Path

METHODS_PACKAGE = Path(__file__).resolve().parents[1] / "methods"
_CLASS_NAME = re.compile(r'^    name = ["\']([a-z0-9][a-z0-9_-]*)["\']', re.MULTILINE)  # a class body's `name = "..."`


@functools.lru_cache(maxsize=None)
def method_names() -> tuple[str, ...]:
    names: set[str] = set()
    for path in sorted(METHODS_PACKAGE.rglob("*.py")):
        text = path.read_text()
        if path.stem not in ("base", "registry") and "register_method(" in text:
            names.update(_CLASS_NAME.findall(text))
    return tuple(sorted(names))
