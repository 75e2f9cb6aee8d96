"""A tiny run of the observability benchmark (``python -m bench.observability --quick``).

The figures come from the full run; this keeps the command working and its
table printing every variant.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_observability_benchmark_prints_its_figures() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.observability", "--quick"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    for variant in ("absent", "idle", "tracing", "tracing\\+metrics"):
        row = rf"^{variant} +\d+ +\d+-\d+ +[+-]\d+\.\d% +\d+\.\d\d +[+-]\d+\.\d%$"
        assert re.search(row, text, re.M), text
    assert "command: " in text and "bench.observability --quick" in text
