"""The shape of the source tree (issue 11): no import circles between files, no import from the core up into
tasks/train/serve/cli, and no source file much over 400 lines."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "peftkit"
#: the layers, bottom up: a file may import from its own layer and the ones below
LAYERS = {"core": 0, "tasks": 1, "train": 2, "search": 3, "serve": 4, "monitor": 4, "ui": 5, "cli": 6}
MAX_LINES = 420


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of peftkit that ``path`` imports at run time (lazy imports in functions included; imports under
    ``if TYPE_CHECKING:`` excluded; ``from pkg import sub`` counts as an import of ``pkg.sub``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for branch in node.body for n in ast.walk(branch)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
            candidates = subs if len(subs) == len(node.names) else [base, *subs]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        found.update(c for c in candidates if c in modules and c != name)
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "core"


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_no_file_imports_upwards():
    upward = sorted((a, b) for a, targets in _graph().items() for b in targets if LAYERS[_layer(b)] > LAYERS[_layer(a)])
    assert not upward, f"imports from a lower layer into a higher one: {upward}"


def test_no_import_circles_between_files():
    graph = _graph()
    circles = []
    for start in graph:  # a path from start back to itself
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    circles.append(path)
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    assert not circles, f"import circles: {circles[:3]}"


def test_no_source_file_is_much_over_400_lines():
    long = {str(p.relative_to(ROOT.parent)): n for p in ROOT.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"split these files: {long}"


def test_import_peftkit_stays_light():
    code = "import sys, peftkit; print(sorted(m for m in ('transformers', 'pydantic', 'fastapi', 'yaml', 'optuna') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"import peftkit pulled in {out}"
