"""One-time messages from the library for the CLI to print (the library never prints), torch-free
so the CLI can read them after any command without importing the training stack.

    NOTICES.append("...")   # a stage; the CLI prints each distinct one once, as `note: ...`
"""

from __future__ import annotations

NOTICES: list[str] = []
