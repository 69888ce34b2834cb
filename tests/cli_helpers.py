import os
import subprocess
import sys
from pathlib import Path


def dpsynth(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess, as a user or a Makefile runs it."""
    return subprocess.run([sys.executable, "-m", "dpsynth", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=900)


def snapshot(path: Path) -> dict:
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
