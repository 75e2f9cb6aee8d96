"""flowkeeper on AWS Lambda.

``handler = flowkeeper_aws_lambda.handler(fk)`` serves HTTP events through
mangum (function URL, API Gateway REST and HTTP APIs, ALB), runs a scheduler
tick for EventBridge scheduled events, and advances a run for a signed direct
invocation.  See :func:`handler`.
"""

from __future__ import annotations

from .events import TICK_EVENT, advance_event, infer
from .handler import LambdaHandler, handler
from .invoke import LambdaInvokeDispatcher

__version__ = "0.1.0"

__all__ = [
    "TICK_EVENT",
    "LambdaHandler",
    "LambdaInvokeDispatcher",
    "__version__",
    "advance_event",
    "handler",
    "infer",
]
