"""flowkeeper in a Vercel Python function.

``app = flowkeeper_vercel.app(fk)`` in ``api/index.py`` is the function's
ASGI entrypoint: the endpoint at ``/api/flowkeeper``, the tick Vercel Cron
calls with ``CRON_SECRET``, and a time budget from the function's
``maxDuration``.  See :func:`app`.
"""

from __future__ import annotations

from .app import DEFAULT_MAX_DURATION, VercelApp, app, on_vercel, vercel_endpoint

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MAX_DURATION",
    "VercelApp",
    "__version__",
    "app",
    "on_vercel",
    "vercel_endpoint",
]
