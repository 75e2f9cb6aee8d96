"""A tiny run of the composition benchmark (``python -m bench.composition --quick``).

The real figures come from the full run; this keeps the command working and
its three tables printing.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_composition_benchmark_prints_its_figures() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.composition", "--quick"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert re.search(r"^asyncio\.gather of 20 such steps +\d+", text, re.M), text
    assert re.search(r"20 branches / 1 branch: \d+\.\d\dx", text), text
    assert re.search(r"^1 parent fanning out to 50 trivial children +\d+", text, re.M), text
    assert re.search(r"children/s as a fraction of plain workflows/s: \d+%", text), text
    assert re.search(r"^10 +\d+\.\d\d +\d+\.\d", text, re.M), text
    assert re.search(r"per-wake ratio 100 / 10 children: \d+\.\d\d", text), text
    assert "command: " in text and "bench.composition --quick" in text
