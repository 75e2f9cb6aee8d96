"""The documentation site builds with ``mkdocs build --strict`` (broken links, bad
references and docstrings mkdocstrings cannot render fail it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_docs_build_strict(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        env=os.environ | {"NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text()
    # The reference is generated from the docstrings, not written by hand.
    assert "Start a run of" in api and "mock_step" in api
    assert (tmp_path / "site" / "guides" / "testing" / "index.html").exists()
