"""The two floors of ``supervisor/``: the HTTP API (``supervisor/api/``) is built on the instance core
and the node, never the reverse.

Checked on the source with ``ast`` (every import statement, at any depth: a function-local import
counts too), so a core module cannot reach for the API even lazily.  Only the daemon, which wires
the two floors together, may import ``supervisor.api``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SUPERVISOR = Path(__file__).resolve().parent.parent / "supervisor"
#: the modules above both floors: they compose them
COMPOSERS = {"_daemon.py"}
CORE = sorted(p for p in SUPERVISOR.glob("*.py") if p.name not in COMPOSERS)


def imported_modules(path: Path) -> list[str]:
    """Every module ``path`` imports, absolute (``from .api import x`` -> ``supervisor.api``, and
    ``from . import api`` -> ``supervisor.api`` too)."""
    package = "supervisor"
    out: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
            else:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parts, node.module] if node.module else parts)
            out.append(base)
            out += [f"{base}.{a.name}" for a in node.names]
    return out


def test_the_core_is_all_there():
    names = {p.name for p in CORE}
    assert {"_instance.py", "_node.py", "_migration.py", "_state.py", "_spec.py"} <= names, names


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.name)
def test_the_core_never_imports_the_api(path):
    api = [m for m in imported_modules(path) if m == "supervisor.api" or m.startswith("supervisor.api.")]
    assert not api, f"{path.name} imports {api}: the API depends on the core, never the reverse"


def test_the_check_sees_every_spelling(tmp_path):
    spellings = ["from .api import create_app", "from . import api", "from .api._errors import HttpError",
                 "import supervisor.api", "from supervisor.api import openapi",
                 "def f():\n    from .api import _routes\n"]
    for i, text in enumerate(spellings):
        p = tmp_path / f"m{i}.py"
        p.write_text(text + "\n")
        assert any(m.startswith("supervisor.api") for m in imported_modules(p)), text
    p = tmp_path / "ok.py"
    p.write_text("from ._node import Node\nfrom . import _state\nimport supervisor._spec\nfrom .apis import x\n")
    assert not any(m == "supervisor.api" or m.startswith("supervisor.api.") for m in imported_modules(p))
