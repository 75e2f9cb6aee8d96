"""A tiny run of the growth benchmark (``python -m bench.growth --quick``).

The figures come from the full run; this keeps the command working and its
table printing.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_growth_benchmark_prints_its_figures() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.growth", "--quick", "--only", "steps", "latency"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert re.search(r"steps: 2,000 steps, \d+ invocations.*\d+\.\d\d \(", text), text
    assert re.search(r"concurrency 64, p50 / p99 +\d+\.\d / \d+\.\d ms", text), text
    assert "command: " in text and "bench.growth --quick" in text
