"""A tiny run of the event benchmark (``python -m bench.events --quick``).

The real figures come from the full run; this keeps the command working, its
tables printing, and the plan it shows using the waits index.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_events_benchmark_prints_its_figures() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.events", "--quick"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert re.search(r"^200 +\d+\.\d\d +\d+\.\d\d-\d+\.\d\d ", text, re.M), text
    assert re.search(r"^2,000 +\d+\.\d\d +\d+\.\d\d-\d+\.\d\d ", text, re.M), text
    assert re.search(r"ratio 2,000 / 200 waiting: \d+\.\d\d", text), text
    # The probe is an index probe, never a scan of the waiting runs.
    assert "Index Scan using waits_match_idx on waits" in text, text
    assert "Seq Scan on waits" not in text, text
    assert re.search(r"^events each waking its own waiting run, events/s +\d+ ", text, re.M)
    assert re.search(r"events/s as a fraction of plain workflows/s: \d+%", text), text
    assert "command: " in text and "bench.events --quick" in text
