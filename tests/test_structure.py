"""The package's structure as docs/design.md draws it: every module in a layer, imports
pointing down the layers only, no cycle (scripts/imports.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_imports_follow_the_layers() -> None:
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "imports.py")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr + done.stdout
    assert " 0 problems" in done.stdout


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    """A breach is reported: the check is not vacuous."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import imports  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(REPO / "scripts"))
    pkg = tmp_path / "fsrepo"
    (pkg / "store").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "store" / "__init__.py").write_text("from ..engine import Engine\n")
    (pkg / "engine.py").write_text("from .store import thing\n")
    _, problems = imports.check(pkg)
    assert any(p.startswith("cycle:") for p in problems), problems
    assert any("upward import: fsrepo.store" in p for p in problems), problems
