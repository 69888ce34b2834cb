"""The package's shape: `dpsynth.privacy` imports without torch, the module import graph has no
cycle, library messages name parameters (the CLI alone turns them into flags)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import NO_TORCH_PRELUDE

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "dpsynth"
PRIVACY_MODULES = ("events", "accountant", "calibration", "plans", "owner_key")


# ---- (a) dpsynth.privacy without torch ---------------------------------------------------------
_NO_TORCH = NO_TORCH_PRELUDE + """
import dpsynth.privacy
""" + "".join(f"import dpsynth.privacy.{name}\n" for name in PRIVACY_MODULES) + """
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
print("ok")
"""


def test_privacy_imports_without_torch():
    # (sys.modules["torch"] = None would do, but SciPy's array-API helpers then trip over the None.)
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH], capture_output=True, text=True,
                          env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_the_torch_blocker_blocks_torch():
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH.replace("import dpsynth.privacy\n", "import torch\n", 1)],
                          capture_output=True, text=True, env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"},
                          timeout=120)
    assert proc.returncode != 0 and "blocked by the test" in proc.stderr


# ---- (b) no import cycle -----------------------------------------------------------------------
def _modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def import_graph() -> dict[str, set[str]]:
    """{module: the package modules it imports}, from every import statement in the file (those
    inside functions too), relative imports resolved; `from m import name` counts as importing
    m.name when that is a module, else m."""
    modules = _modules()

    def owner(name: str) -> str | None:  # the longest prefix of `name` that is a module of ours
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, (path, is_package) in modules.items():
        package = module if is_package else module.rpartition(".")[0]
        edges: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                edges.update(owner(alias.name) for alias in node.names if alias.name.split(".")[0] == "dpsynth")
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if source.split(".")[0] != "dpsynth":
                    continue
                for alias in node.names:
                    target = f"{source}.{alias.name}"
                    edges.add(target if target in modules else owner(source))
        edges.discard(None)
        edges.discard(module)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_import_graph_sees_relative_and_function_level_imports():
    graph = import_graph()
    assert "dpsynth.pipeline.common" in graph["dpsynth.pipeline.evaluate"]  # from .common import ...
    assert "dpsynth.notices" in graph["dpsynth.cli.main"]  # imported inside _print_notices
    assert len(graph) > 50


def test_no_import_cycle_inside_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# ---- (c) the CLI maps parameter names to its flags --------------------------------------------
def test_to_flags_maps_assignments_and_backticked_names():
    from dpsynth.cli.flags import to_flags

    flags = {"batch_size": "--batch-size", "eps": "--eps", "run": "--run"}
    assert to_flags("batch_size=500 must be <= 100", flags) == "--batch-size 500 must be <= 100"
    assert to_flags("raise `eps` or lower `batch_size`", flags) == "raise --eps or lower --batch-size"
    # Names the command lacks stay as they are (an assignment) or lose their backticks (a hint) ...
    assert to_flags("lr=0.1 and `lr`", flags) == "lr=0.1 and lr"
    # ... unless another command has them: a hint may name another command's flag.
    assert to_flags("create the run with `holdout` F", flags, {"holdout": "--holdout"}) == \
        "create the run with --holdout F"
    assert to_flags("holdout=0.1", flags, {"holdout": "--holdout"}) == "holdout=0.1"
    # Only whole names: 'x.batch_size=' and 'max_batch_size=' are left alone.
    assert to_flags("x.batch_size=1 max_batch_size=2", flags) == "x.batch_size=1 max_batch_size=2"


def test_command_flags_are_the_invoked_commands_typer_parameters():
    from dpsynth.cli.app import app
    from dpsynth.cli.flags import all_flags, command_flags

    flags = command_flags(app, ["select-public", "--sigma", "1"])
    assert flags["eps_query"] == "--eps-query" and flags["top_k"] == "--top-k" and flags["run"] == "--run"
    assert "val_eps" not in flags and command_flags(app, ["--help"]) == {}
    assert command_flags(app, ["evaluate"])["device"] == "--device"
    assert all_flags(app)["holdout"] == "--holdout" and all_flags(app)["val_eps"] == "--val-eps"


@pytest.mark.parametrize("argv,expected", [
    (["generate", "--n", "0"], "error: --n 0 is not allowed; it must be an integer > 0"),
    (["select-public", "--sensitive", "fashionmnist"],
     "error: give exactly one of --sigma (noise multiplier) or --eps-query (epsilon of the query)"),
    (["evaluate", "--epochs", "0"], "error: --epochs 0 is not allowed; it must be an integer > 0"),
])
def test_a_library_message_reaches_the_user_in_flags(argv, expected, tmp_path, capsys):
    from dpsynth.cli.main import main

    assert main([*argv, "--run", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == expected


def test_the_library_itself_names_the_parameter():
    from dpsynth.errors import BadInput
    from dpsynth.pipeline.generate import run_generate

    with pytest.raises(BadInput, match=r"^batch_size=0 is not allowed"):
        run_generate("nowhere", n=1, batch_size=0)


# ---- (d) no flag spelled outside cli/ ----------------------------------------------------------
# Files (relative to src/dpsynth) still allowed to spell `--flag`s. Each entry is owned elsewhere
# or is a CLI of its own; remove it once converted (the test then keeps it converted).
FLAG_ALLOW_LIST = {
    # its own argparse entry point (`python -m dpsynth.data.provision --data-root DIR`):
    "data/provision.py",
    # the whole command line to type after Ctrl-C (`dpsynth finetune --run R --resume --eps E`):
    "pipeline/checkpoints.py",
}
# '--eps', and '--{name}' (an f-string part ending in ' --'); a bare '--' (a line style) is no flag.
_FLAG = re.compile(r"(?<![\w-])--[a-z]|\s--$")


def flag_strings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string literal that spells a flag; docstrings are documentation."""
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return sorted({(node.lineno, node.value) for node in ast.walk(tree)
                   if isinstance(node, ast.Constant) and isinstance(node.value, str)
                   and id(node) not in docstrings and _FLAG.search(node.value)})


def test_the_flag_finder_sees_plain_and_f_string_flags(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('"""Docs may say --eps."""\nraise X(f"--eps {e} bad")\nraise X(f"setting --{k}")\n'
                      'y = "a -- b, x--y, eps=1"\n')
    assert [line for line, _ in flag_strings(sample)] == [2, 3]


def test_no_message_outside_cli_names_a_flag():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith("cli/") or rel in FLAG_ALLOW_LIST:
            continue
        offenders += [f"{rel}:{line}: {text!r}" for line, text in flag_strings(path)]
    assert not offenders, ("library messages name parameters (`batch_size=0`, `eps`), the CLI maps them to "
                           "flags:\n" + "\n".join(offenders))


def test_the_allow_list_names_existing_files():
    assert all((PACKAGE / rel).is_file() for rel in FLAG_ALLOW_LIST)
