from __future__ import annotations

import json

from django.db import connection, transaction
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from .models import Order
from .workflows import fk


@csrf_exempt  # a JSON API for the example; keep CSRF on for your browser forms
@require_POST
def create_order(request: HttpRequest) -> JsonResponse:
    body = json.loads(request.body)
    with transaction.atomic():
        order = Order.objects.create(item=body["item"])
        # In the same transaction as the order: both commit, or neither exists.
        # The run is pushed to the endpoint once the transaction commits.
        handle = fk.sync.trigger("fulfil", order.id, connection=connection)
        if body.get("fail"):
            raise ValueError("payment declined")
    return JsonResponse({"order_id": order.id, "run_id": handle.run_id}, status=201)


def show_run(request: HttpRequest, run_id: str) -> JsonResponse:
    info = fk.sync.get_run(run_id)
    return JsonResponse({"status": info.status, "output": info.output})
