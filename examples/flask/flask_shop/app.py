"""A Flask app using flowkeeper through its sync API, the endpoint mounted by a2wsgi.

Run it with ``flask --app flask_shop.app run`` (DATABASE_URL, FLOWKEEPER_SIGNING_KEY
and FLOWKEEPER_ENDPOINT=http://localhost:5000/api/flowkeeper set), and a driver
for due runs (``flowkeeper scheduler``).
"""

from __future__ import annotations

import os

import psycopg
from flask import Flask, jsonify, request

from flowkeeper.wsgi import mount

from .workflows import User, fk

app = Flask(__name__)
# Everything under /api/flowkeeper goes to flowkeeper's endpoint (ASGI, via a2wsgi).
app.wsgi_app = mount(app.wsgi_app, "/api/flowkeeper", fk.wsgi())


@app.post("/signup")
def signup():
    user = User.model_validate(request.get_json())
    # fk.sync: blocking calls, safe from Flask's threads, no event loop needed.
    handle = fk.sync.trigger("welcome", user, idempotency_key=user.email)
    return jsonify(run_id=handle.run_id, created=handle.created), 201


@app.post("/orders")
def create_order():
    body = request.get_json()
    # The order row and its run commit together, or neither exists.
    with psycopg.connect(os.environ["DATABASE_URL"]) as conn, conn.transaction():
        order_id = conn.execute(
            "INSERT INTO orders (item) VALUES (%s) RETURNING id", (body["item"],)
        ).fetchone()[0]
        handle = fk.sync.trigger("fulfil", order_id, connection=conn)
        if body.get("fail"):
            raise ValueError("payment declined")  # rolls back the order and the run
    return jsonify(order_id=order_id, run_id=handle.run_id), 201


@app.get("/runs/<run_id>")
def show_run(run_id: str):
    info = fk.sync.get_run(run_id)
    return jsonify(status=info.status, output=info.output)
