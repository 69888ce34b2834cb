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


# Python source that makes every later `import torch` fail: prepend it to a `python -c` program.
NO_TORCH_PRELUDE = """
import sys

class NoTorch:  # a meta-path finder: `import torch` (or any torch.*) raises ModuleNotFoundError
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None

sys.meta_path.insert(0, NoTorch())
"""
