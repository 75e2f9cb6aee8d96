"""A tiny run of the flow-control benchmark (``python -m bench.flowcontrol --quick``).

The real figures come from the full run; this keeps the command working and its
ratios printing.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_flowcontrol_benchmark_prints_its_ratios() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.flowcontrol", "--quick"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert re.search(r"ratio 4,000 / 400 queued: \d+\.\d\d \(target <= 1\.3\)", text), text
    spread = r"\d+% \(rounds \d+% to \d+%\)"
    assert re.search(rf"limits declared / none: {spread} \(target >= 90%\)", text), text
    assert re.search(
        rf"while the ticks prune / the same ticks not pruning: {spread} \(target >= 80%\)", text
    ), text
    assert re.search(rf"while pruning back to back / not pruning: {spread}", text), text
    assert "command: " in text and "bench.flowcontrol --quick" in text
