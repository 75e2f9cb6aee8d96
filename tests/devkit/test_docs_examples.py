"""Every Python code block of README.md and docs/ is executed, or says why not.

A block whose first line names a file (``# shop/workflows.py``) is part of
that document's sample project: the files are written to a folder, every
module is imported, and the test files among them are run by pytest as a user
would run them (the flowkeeper plugin from the installed entry point). Any
other block must follow ``<!-- not-run: reason -->``. A document that tests
another's sample project says so: ``<!-- project: ../getting-started.md -->``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.M | re.S)
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(\S.*?)-->\s*$", re.S)
PROJECT = re.compile(r"<!--\s*project:\s*(\S+)\s*-->")
FILE_LINE = re.compile(r"^#\s*([\w./-]+\.(?:py|toml))\s*$")


@dataclass
class Block:
    doc: Path
    line: int
    lang: str
    code: str
    not_run: str | None

    @property
    def file(self) -> str | None:
        first = self.code.split("\n", 1)[0]
        m = FILE_LINE.match(first)
        return m.group(1) if m else None


def documents() -> list[Path]:
    docs = [ROOT / "README.md"]
    if (ROOT / "docs").exists():
        docs += sorted((ROOT / "docs").rglob("*.md"))
    return docs


def blocks(doc: Path) -> list[Block]:
    text = doc.read_text()
    out = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = NOT_RUN.search(before)
        out.append(
            Block(
                doc,
                text[: m.start()].count("\n") + 1,
                m.group(1),
                m.group(2),
                marker.group(1).strip() if marker else None,
            )
        )
    return out


def test_every_python_block_is_run_or_says_why_not() -> None:
    loose = [
        f"{b.doc.relative_to(ROOT)}:{b.line}"
        for doc in documents()
        for b in blocks(doc)
        if b.lang == "python" and b.file is None and b.not_run is None
    ]
    assert not loose, (
        "Python blocks that are neither a file of the sample project ('# path.py' first line) "
        f"nor marked '<!-- not-run: reason -->': {loose}"
    )


def _projects() -> list[Path]:
    return [d for d in documents() if any(b.file for b in blocks(d) if b.lang == "python")]


@pytest.mark.slow
@pytest.mark.parametrize("doc", _projects(), ids=lambda d: str(d.relative_to(ROOT)))
def test_sample_project_of_the_document_runs(doc: Path, tmp_path: Path) -> None:
    files: dict[str, str] = {}
    sources = [(doc.parent / m).resolve() for m in PROJECT.findall(doc.read_text())] + [doc]
    for b in [b for source in sources for b in blocks(source)]:
        if b.file and b.not_run is None:
            # Several blocks for one file (a later section adds to it) are joined.
            files[b.file] = files.get(b.file, "") + b.code
    for name, code in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(code)
    for folder in {p.parent for p in tmp_path.rglob("*.py")}:
        if folder != tmp_path and not (folder / "__init__.py").exists():
            (folder / "__init__.py").write_text("")
    if "pyproject.toml" not in files:
        (tmp_path / "pyproject.toml").write_text(
            '[tool.pytest.ini_options]\nasyncio_mode = "auto"\n'
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWKEEPER_")}
    env.pop("DATABASE_URL", None)
    env["PYTHONPATH"] = str(tmp_path)
    modules = [
        n[:-3].replace("/", ".")
        for n in files
        if n.endswith(".py") and not Path(n).name.startswith("test_")
    ]
    # Importing runs each module's top level (FlowKeeper() reads the environment).
    check = subprocess.run(
        [sys.executable, "-c", "import " + ", ".join(modules)],
        cwd=tmp_path,
        env=env
        | {
            "DATABASE_URL": "postgresql://nobody@unused.invalid/x",
            "FLOWKEEPER_SIGNING_KEY": "docs-example-signing-key-0123456789",
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 0, check.stderr
    tests = [n for n in files if Path(n).name.startswith("test_")]
    if tests:
        out = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert re.search(rf"\b{len(_test_functions(files, tests))} passed\b", out.stdout), (
            out.stdout
        )


def _test_functions(files: dict[str, str], tests: list[str]) -> list[str]:
    return [m for t in tests for m in re.findall(r"^(?:async )?def (test_\w+)", files[t], re.M)]
