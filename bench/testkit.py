"""How long a user's simple workflow test takes with the flowkeeper pytest plugin.

Writes a throw-away project with N tests (the README's checkout workflow: two
steps and a one-day sleep, run to completion by ``flowkeeper_runner``), runs
pytest on it in a subprocess as a user would, and reports the time per test
(setup + call + teardown, from pytest's own ``--durations``), the first test
(which starts the private PostgreSQL and migrates) apart.

    .venv/bin/python -m bench.testkit [--tests 50]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
from collections import defaultdict
from pathlib import Path

WORKFLOWS = """
from datetime import timedelta

from pydantic import BaseModel

from flowkeeper import Context, FlowKeeper

fk = FlowKeeper()


class Order(BaseModel):
    id: str
    amount_cents: int


async def charge(order: Order) -> str:
    return f"ch_{order.id}"


def receipt(order: Order, charge_id: str) -> str:
    return f"receipt {charge_id}"


@fk.workflow("checkout")
async def checkout(ctx: Context, order: Order) -> str:
    charge_id = await ctx.step("charge-card", charge, order)
    await ctx.step("send-receipt", receipt, order, charge_id)
    await ctx.sleep("wait-1-day", timedelta(days=1))
    return charge_id
"""

TEST = """
import pytest

from shop.workflows import Order


@pytest.mark.parametrize("n", range({n}))
async def test_checkout(flowkeeper_runner, n):
    info = await flowkeeper_runner.run("checkout", Order(id=f"o-{{n}}", amount_cents=n))
    assert info.status == "completed" and info.output == f"ch_o-{{n}}"
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tests", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="flowkeeper-testkit-") as tmp:
        root = Path(tmp)
        (root / "shop").mkdir()
        (root / "shop" / "__init__.py").write_text("")
        (root / "shop" / "workflows.py").write_text(textwrap.dedent(WORKFLOWS))
        (root / "test_checkout.py").write_text(TEST.format(n=args.tests))
        (root / "pyproject.toml").write_text(
            "[tool.pytest.ini_options]\n"
            'asyncio_mode = "auto"\n'
            'flowkeeper_app = "shop.workflows:fk"\n'
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWKEEPER_")}
        env.pop("DATABASE_URL", None)
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "--durations=0",
                "--durations-min=0",
            ],
            cwd=root,
            env=env | {"PYTHONPATH": str(root)},
            capture_output=True,
            text=True,
            timeout=900,
        )
    if out.returncode != 0:
        print(out.stdout, out.stderr)
        return 1
    per_test: dict[str, float] = defaultdict(float)
    for m in re.finditer(r"^([\d.]+)s (setup|call|teardown)\s+(\S+)$", out.stdout, re.M):
        per_test[m.group(3)] += float(m.group(1))
    order = [f"test_checkout.py::test_checkout[{i}]" for i in range(args.tests)]
    times = [per_test.get(name, 0.0) for name in order]
    first, rest = times[0], times[1:]
    rest_ms = sorted(t * 1000 for t in rest)
    print(f"flowkeeper_runner, {args.tests} checkout tests (2 steps + a one-day sleep each):")
    print(f"  first test (starts PostgreSQL, migrates): {first * 1000:.0f} ms")
    print(
        f"  the others: median {statistics.median(rest_ms):.0f} ms, "
        f"p90 {rest_ms[int(len(rest_ms) * 0.9) - 1]:.0f} ms, max {rest_ms[-1]:.0f} ms "
        "(setup + call + teardown, pytest --durations)"
    )
    print(f"  load average at the end: {os.getloadavg()[0]:.1f}; command: {' '.join(sys.argv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
