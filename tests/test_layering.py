"""Imports point one way: app -> model, training -> model. `model` never imports app or training; app and
training never import each other. Scans every .py file's import statements (the AST, not the text), so
an import inside a function counts too.

    .venv/bin/pytest -q tests/test_layering.py
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"model": {"app", "training"}, "app": {"training"}, "training": {"app"}}


def imported_packages(path: Path) -> set[str]:
    """Top-level package names a file imports (relative imports resolve inside its own package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level > 0:
                found.add(path.relative_to(ROOT).parts[0])
    return found


def _files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py")) if (ROOT / package).is_dir() else []


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package: str) -> None:
    bad = [f"{f.relative_to(ROOT)} imports {sorted(imported_packages(f) & FORBIDDEN[package])}"
           for f in _files(package) if imported_packages(f) & FORBIDDEN[package]]
    assert not bad, "layering violated: " + "; ".join(bad)


def test_scanner_sees_nested_and_relative_imports(tmp_path: Path) -> None:
    f = ROOT / "model" / "__init__.py"
    assert "app" not in imported_packages(f)
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    import app.routes\n    from training.data import x\n")
    assert imported_packages(probe) >= {"app", "training"}
    assert _files("model"), "model/ has no Python files?"
