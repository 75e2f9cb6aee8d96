"""Load an example app fresh, with the environment its FlowKeeper() reads."""

from __future__ import annotations

import importlib
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from werkzeug.serving import make_server

ROOT = Path(__file__).resolve().parents[2]


def load_example(folder: str, module: str) -> Any:
    """Import ``module`` from examples/<folder> anew (its fk reads the environment now)."""
    path = str(ROOT / "examples" / folder)
    if path not in sys.path:
        sys.path.insert(0, path)
    package = module.split(".", 1)[0]
    for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        del sys.modules[name]
    return importlib.import_module(module)


@contextmanager
def wsgi_server(app: Any, port: int) -> Iterator[str]:
    """A real threaded WSGI server on 127.0.0.1:port (werkzeug's)."""
    server = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        thread.join(10)
