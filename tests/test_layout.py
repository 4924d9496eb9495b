"""The layout rules that import-linter (``make lint``) does not check: only the entry points at the top of
``mer/``, and no private name imported from another module (make it public, or move it)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_only_the_entry_points_sit_at_the_top_of_the_package() -> None:
    assert sorted(p.name for p in (ROOT / "mer").glob("*.py")) == ["__init__.py", "cli.py", "config.py", "demo.py"]


def test_no_private_name_is_imported_across_modules() -> None:
    found = []
    for tree_root in ("mer", "jobs", "tests"):
        for path in sorted((ROOT / tree_root).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("mer", "jobs"):
                    found += [f"{path.relative_to(ROOT)}:{node.lineno} {node.module}.{a.name}"
                              for a in node.names if a.name.startswith("_")]
    assert found == []
