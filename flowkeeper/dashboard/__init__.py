"""The run dashboard, served by the endpoint itself under ``/ui`` (no second service).

See :mod:`flowkeeper.dashboard.routes` for the pages and API,
:mod:`flowkeeper.dashboard.auth` for sign-in and CSRF, and
:mod:`flowkeeper.dashboard.timeline` for the timeline both the dashboard and
``flowkeeper runs show`` draw.  HTML, CSS and JavaScript ship as package
data: there is no front-end build step.
"""

from __future__ import annotations

from .routes import create_dashboard

__all__ = ["create_dashboard"]
