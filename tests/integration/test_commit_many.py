"""One statement for a batch of step writes (commit_lean_many) does what they do one by one.

Group commit sends the consecutive lean step writes of a batch as one
statement.  Each run must still be fenced on its own, a refused run must
write no steps, a run's two writes (parallel branches) must stay two, and the
tables must end up exactly as if every write had gone alone: checked with
hypothesis on batches of hostile values against a twin schema written one by
one.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowkeeper import FlowKeeper
from flowkeeper.groupcommit import BatchRefused
from flowkeeper.store import StepRecord, Store, _statements

from ..helpers import KEY

LEASE = timedelta(seconds=60)
T0 = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)

_text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=8
)
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(_text, c, max_size=3),
    max_leaves=6,
).map(lambda v: json.dumps(v, ensure_ascii=False))

_step = st.builds(
    lambda key, output, kind, failed, timed: (key, output, kind, failed, timed),
    st.sampled_from(["a", "b", "a:1", "key with spaces", "é", "fk:enc:x", "$refs"]),
    _json,
    st.sampled_from(["step", "sleep"]),
    st.booleans(),
    # A sleep without its own wake time wakes when its run is due (the write's).
    st.booleans(),
)
_write = st.fixed_dictionaries(
    {
        "run": st.integers(0, 5),
        "stale": st.booleans(),
        "ending": st.sampled_from(["flush", "sleep", "completed", "failed", "at"]),
        "output": _json,
        "steps": st.lists(_step, max_size=3, unique_by=lambda s: s[0]),
    }
)


def _record(
    position: int, key: str, output: str, kind: str, failed: bool, timed: bool = True
) -> StepRecord:
    return StepRecord(
        key=key,
        position=position,
        name=key,
        kind=kind,
        status="sleeping" if kind == "sleep" else ("failed" if failed else "completed"),
        input=None,
        output=None if kind == "sleep" else output,
        output_type=None,
        error={"type": "E", "message": output} if failed and kind == "step" else None,
        attempts=1,
        started_at=T0,
        finished_at=None if kind == "sleep" else T0,
        wake_at=T0 + timedelta(hours=1) if kind == "sleep" and timed else None,
    )


def _args(store: Store, run_id: str, token: uuid.UUID, w: dict[str, Any], base: int) -> tuple:
    """commit_lean's arguments for one generated write (as Store.commit builds them)."""
    from flowkeeper.store import _step_columns, _stored_outputs

    steps = [_record(base + i, *s) for i, s in enumerate(w["steps"])]
    outputs = _stored_outputs(steps, store.sealer)
    ending = w["ending"]
    status = {"flush": "running", "sleep": "sleeping", "at": "sleeping"}.get(ending, ending)
    return (
        uuid.UUID(run_id),
        token,
        status,
        token if ending == "flush" else None,
        timedelta(minutes=5) if ending == "sleep" else None,
        T0 + timedelta(days=1) if ending == "at" else None,
        w["output"] if ending == "completed" else None,
        json.dumps({"type": "E", "message": w["output"]}) if ending == "failed" else None,
        "a" if ending == "flush" else None,
        1,
        *_step_columns(steps, outputs, [0] * len(steps), store.sealer),
        ending == "flush",
    )


async def _fresh(fk: FlowKeeper, runs: int) -> tuple[list[str], list[uuid.UUID]]:
    store = fk.store
    await store.ensure_schema()
    async with fk.db.acquire() as conn:
        await conn.execute(f"TRUNCATE {store.schema}.runs CASCADE")
    ids, tokens = [], []
    for n in range(runs):
        run_id, token = str(uuid.UUID(int=n + 1)), uuid.UUID(int=1000 + n)
        claimed = await store.create_claimed(
            run_id=run_id, workflow="w", input_json="null", idempotency_key=None,
            lease_token=token, lease=LEASE,
        )  # fmt: skip
        assert not isinstance(claimed, tuple)
        ids.append(run_id)
        tokens.append(token)
    return ids, tokens


async def _tables(fk: FlowKeeper) -> Any:
    s = fk.store.schema
    async with fk.db.acquire() as conn:
        runs = await conn.fetch(
            f"SELECT id, status, lease_token, output::text, error::text, step_key, step_attempt, "
            f"executing, lost_attempts, due_at IS NULL AS undue, finished_at IS NULL AS live "
            f"FROM {s}.runs ORDER BY id"
        )
        steps = await conn.fetch(
            f"SELECT run_id, key, position, kind, status, output::text, error::text, wake_at "
            f"FROM {s}.steps ORDER BY run_id, key"
        )
    return [tuple(r) for r in runs], [tuple(r) for r in steps]


async def _fixed_clock(fk: FlowKeeper) -> None:
    """The twin's clock stopped at T0, so that due and wake times the database
    computes (a sleep that wakes when its run is due) compare exactly."""
    if fk.__dict__.get("_clock_fixed"):
        return
    await fk.store.ensure_schema()
    async with fk.db.acquire() as conn:
        await conn.execute(
            f"CREATE OR REPLACE FUNCTION {fk.store.schema}.clock_now() RETURNS timestamptz "
            f"LANGUAGE sql STABLE PARALLEL SAFE AS $$ SELECT '{T0.isoformat()}'::timestamptz $$"
        )
    fk.__dict__["_clock_fixed"] = True


@pytest.fixture
async def twins(database_url: str) -> Any:
    merged = FlowKeeper(database_url, signing_key=KEY, schema="fk_merged", pool_size=2)
    alone = FlowKeeper(database_url, signing_key=KEY, schema="fk_alone", pool_size=2)
    yield merged, alone
    await merged.aclose()
    await alone.aclose()


#: The twin tests' hypothesis settings: each example goes through the real database.
_twin_settings = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


async def _sent(fk: FlowKeeper, merged: FlowKeeper, writes: list[Any], what: str) -> list[Any]:
    """A batch's rows: through _call_many on the merged twin, write by write on the other."""
    if fk is merged:
        try:
            return await fk.store._call_many(writes)
        except BatchRefused:
            pytest.fail(f"a batch of storable {what} was refused")
    return [await fk.store._call("fetchrow", n, *a) for n, a in writes]


@_twin_settings
@given(batch=st.lists(_write, min_size=2, max_size=8))
async def test_a_merged_batch_writes_what_its_writes_write_alone(
    twins: tuple[FlowKeeper, FlowKeeper], batch: list[dict[str, Any]]
) -> None:
    merged, alone = twins
    results = {}
    for fk in (merged, alone):
        await _fixed_clock(fk)
        ids, tokens = await _fresh(fk, 6)
        positions = [0] * 6
        writes = []
        for w in batch:
            token = uuid.uuid4() if w["stale"] else tokens[w["run"]]
            writes.append(
                ("commit_lean", _args(fk.store, ids[w["run"]], token, w, positions[w["run"]]))
            )
            positions[w["run"]] += len(w["steps"])
        rows = await _sent(fk, merged, writes, "writes")
        results[fk is merged] = ([r is None for r in rows], await _tables(fk))
    assert results[True] == results[False]


def _plan(
    name: str, run: uuid.UUID, value: Any = None, *, inputs: Any = (), outputs: Any = ()
) -> tuple[str, tuple[Any, ...]]:
    """A write of ``run`` for the statement plan alone: ``value`` is a create's
    input or a step write's run output, ``inputs``/``outputs`` its steps'."""
    args: list[Any] = [run] + [None] * 23
    if name == "commit_lean":
        args[6] = value
        args[15], args[16], args[18] = list(inputs), list(outputs), [None] * len(outputs)
    else:
        args[2] = value
    return name, tuple(args)


def test_a_runs_two_writes_stay_two_statements() -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    writes = [
        _plan("commit_lean", a),
        _plan("commit_lean", b),
        _plan("commit_lean", a),  # a's second write: a new statement after a's first
        _plan("claim_run", b),
        _plan("commit_lean", b),
    ]
    assert [(n, len(g)) for n, g in _statements(writes)] == [
        ("commit_lean_many", 2),
        ("commit_lean", 1),
        ("claim_run", 1),
        ("commit_lean", 1),
    ]


async def test_a_refused_value_in_a_merged_statement_refuses_the_batch_whole(
    twins: tuple[FlowKeeper, FlowKeeper],
) -> None:
    fk, _ = twins
    ids, tokens = await _fresh(fk, 3)
    good = {"ending": "completed", "output": '"ok"', "steps": []}
    bad = list(_args(fk.store, ids[1], tokens[1], {**good, "ending": "failed"}, 0))
    bad[7] = r'{"type": "E", "message": "x\u0000"}'  # jsonb refuses \u0000
    writes = [
        ("commit_lean", _args(fk.store, ids[0], tokens[0], good, 0)),
        ("commit_lean", tuple(bad)),
        ("commit_lean", _args(fk.store, ids[2], tokens[2], good, 0)),
    ]
    with pytest.raises(BatchRefused):
        await fk.store._call_many(writes)
    runs, _ = await _tables(fk)
    assert {r[1] for r in runs} == {"running"}  # nothing of the batch was committed


# Creates of new runs handed over by trigger(): ids and idempotency keys that
# collide with each other in the batch and with runs that exist already, keys
# that look like SQL or array syntax, and inputs of every JSON shape.
_create = st.fixed_dictionaries(
    {
        "id": st.integers(1, 8),  # 1-3 exist before the batch
        "workflow": st.sampled_from(["w", "other", 'w"{,}']),
        "key": st.none() | st.sampled_from(["k", "k2", "{a,b}", "NULL", "'); --", "é"]),
        "input": _json,
    }
)


def _create_args(store: Store, c: dict[str, Any], n: int) -> tuple[Any, ...]:
    """create_claimed_run's arguments, as Store.create_claimed builds them: each
    write its own lease token, so the tables show which of a run id's writes took."""
    return (
        uuid.UUID(int=c["id"]),
        c["workflow"],
        store.sealer.seal_json(c["input"]),
        c["key"],
        uuid.UUID(int=10_000 + n),
        LEASE,
        None,
    )


async def _created_tables(fk: FlowKeeper) -> Any:
    s = fk.store.schema
    async with fk.db.acquire() as conn:
        rows = await conn.fetch(
            f"SELECT id, workflow, status, input::text, idempotency_key, lease_token, "
            f"invocations, executing FROM {s}.runs ORDER BY id"
        )
    return [tuple(r) for r in rows]


@_twin_settings
@given(
    creates=st.lists(_create, min_size=2, max_size=8),
    commits=st.lists(st.integers(0, 2), max_size=3, unique=True),
    seed=st.randoms(use_true_random=False),
)
async def test_merged_creates_create_what_they_create_alone(
    twins: tuple[FlowKeeper, FlowKeeper],
    creates: list[dict[str, Any]],
    commits: list[int],
    seed: Any,
) -> None:
    merged, alone = twins
    results = {}
    order = list(range(len(creates) + len(commits)))
    seed.shuffle(order)  # creates and step writes of other runs, interleaved
    for fk in (merged, alone):
        store = fk.store
        await store.ensure_schema()
        async with fk.db.acquire() as conn:
            await conn.execute(f"TRUNCATE {store.schema}.runs CASCADE")
        for n in (1, 2, 3):  # existing runs, holding keys k and k2 of workflow w
            await store.create_claimed(
                run_id=str(uuid.UUID(int=n)), workflow="w", input_json="null",
                idempotency_key={1: "k", 2: "k2"}.get(n), lease_token=uuid.UUID(int=5000 + n),
                lease=LEASE,
            )  # fmt: skip
        done = {"ending": "completed", "output": '"ok"', "steps": [], "stale": False}
        items = [
            ("create_claimed_run", _create_args(store, c, n)) for n, c in enumerate(creates)
        ] + [
            ("commit_lean", _args(store, str(uuid.UUID(int=n + 1)), uuid.UUID(int=5001 + n),
                                  done, 0))
            for n in commits
        ]  # fmt: skip
        writes = [items[i] for i in order]
        rows = await _sent(fk, merged, writes, "creates")
        # Clock readings differ between the twins; the merged row also names its key.
        skip = ("db_now", "created_at", "due_at", "idempotency_key")
        shown = [None if r is None else {k: v for k, v in r.items() if k not in skip}
                 for r in rows]  # fmt: skip
        results[fk is merged] = (shown, await _created_tables(fk))
    assert results[True] == results[False]


def test_creates_go_first_as_one_statement_and_step_writes_merge_around_them() -> None:
    a, b, c, d = (uuid.uuid4() for _ in range(4))
    writes = [
        _plan("commit_lean", a),
        _plan("create_claimed_run", c),
        _plan("commit_lean", b),
        _plan("create_claimed_run", d),
        _plan("commit_lean", a),
    ]
    assert list(_statements(writes)) == [
        ("create_claimed_many", [1, 3]),
        ("commit_lean_many", [0, 2]),
        ("commit_lean", [4]),
    ]
    # One create stays create_claimed_run, in its place.
    assert list(_statements(writes[:3])) == [
        ("commit_lean", [0]),
        ("create_claimed_run", [1]),
        ("commit_lean", [2]),
    ]


# Flow-controlled creates (create_gated_run): limits of one and two that bind
# within the batch, keys shared by several runs, rate keys, runs with no keys,
# ids and idempotency keys colliding.
_gated = st.fixed_dictionaries(
    {
        "id": st.integers(1, 6),
        "key": st.none() | st.sampled_from(["k", "k2"]),
        "flow": st.lists(st.sampled_from(["a", "b", "{c,d}", 'e"']), max_size=3, unique=True),
        "limit": st.sampled_from([1, 2, 5]),
        "rate": st.lists(st.sampled_from(["r", "s"]), max_size=2, unique=True),
        "priority": st.sampled_from([0, 1, 1000]),
        "input": _json,
    }
)


def _gated_args(store: Store, g: dict[str, Any]) -> tuple[Any, ...]:
    """create_gated_run's arguments, as Store.create_gated builds them."""
    return store.insert_args(
        run_id=str(uuid.UUID(int=100 + g["id"])),
        workflow="g",
        input_json=g["input"],
        idempotency_key=g["key"],
        lease_token=uuid.uuid4(),
        lease=LEASE,
        flow_keys=[f"wf:g:{k}" for k in g["flow"]] or None,
        flow_limits=[g["limit"]] * len(g["flow"]) or None,
        priority=g["priority"],
        timeout=timedelta(hours=1),
        start_timeout=None,
        rate_keys=[f"wf:g:{k}" for k in g["rate"]] or None,
        rate_spacing=[timedelta(seconds=30)] * len(g["rate"]) or None,
    )


async def _gated_tables(fk: FlowKeeper) -> Any:
    s = fk.store.schema
    async with fk.db.acquire() as conn:
        runs = await conn.fetch(
            f"SELECT id, status, input::text, idempotency_key, flow_keys, flow_limits, "
            f"rate_keys, priority, blocked_key, executing, lease_token IS NULL, "
            f"started_at IS NULL, invocations, lost_attempts, deadline IS NULL, "
            f"start_deadline IS NULL, code_version, "
            f"due_at > {s}.clock_now() + interval '1 second' AS later, "
            f"due_at > {s}.clock_now() + interval '50 seconds' AS leased "
            f"FROM {s}.runs ORDER BY id"
        )
        slots = await conn.fetch(f"SELECT key, run_id FROM {s}.slots ORDER BY key, run_id")
        # A batch's prelock (migration 0019) adds rate keys it locks as never used.
        rates = await conn.fetch(
            f"SELECT key FROM {s}.rate_limits WHERE tat > '-infinity' ORDER BY key"
        )
        events = await conn.fetch(f"SELECT run_id, kind FROM {s}.events ORDER BY run_id, id")
    return [[tuple(r) for r in rows] for rows in (runs, slots, rates, events)]


@_twin_settings
@given(creates=st.lists(_gated, min_size=2, max_size=8))
async def test_merged_gated_creates_gate_as_they_gate_alone(
    twins: tuple[FlowKeeper, FlowKeeper], creates: list[dict[str, Any]]
) -> None:
    merged, alone = twins
    results = {}
    for fk in (merged, alone):
        store = fk.store
        await store.ensure_schema()
        async with fk.db.acquire() as conn:
            await conn.execute(f"TRUNCATE {store.schema}.runs, {store.schema}.rate_limits CASCADE")
        # A run already holding a slot of key a, and the idempotency key k.
        first = {"id": 0, "key": "k", "flow": ["a"], "limit": 5, "rate": [], "priority": 0,
                 "input": "null"}  # fmt: skip
        await store._call("fetchrow", "create_gated_run", *_gated_args(store, first))
        writes = [("create_gated_run", _gated_args(store, g)) for g in creates]
        rows = await _sent(fk, merged, writes, "gated creates")
        shown = [(r["outcome"], r["id"], r["workflow"]) for r in rows]
        results[fk is merged] = (shown, await _gated_tables(fk))
    assert results[True] == results[False]


# Gated creates that may all have room (migration 0020's set path): every run
# has keys (a key twice in one run too), a lease and no rate keys; limits from
# one, binding at once, to eight, never binding in a batch of eight, and one
# key's limit differing from run to run; ids and idempotency keys colliding.
_roomy = st.fixed_dictionaries(
    {
        "id": st.integers(1, 6),
        "key": st.none() | st.sampled_from(["k", "k2"]),
        "flow": st.lists(st.sampled_from(["a", "b", "{c,d}", 'e"']), min_size=1, max_size=3),
        "limit": st.integers(1, 8),
        "rate": st.just([]),
        "priority": st.sampled_from([0, 1000]),
        "input": _json,
    }
)


def _room_for_all(creates: list[dict[str, Any]]) -> bool:
    """Whether a batch goes the set path: no id twice, and each key has room for
    every run of the batch that holds it, within each such run's limit (the
    run created first holds a slot of key a)."""
    ids = [g["id"] for g in creates]
    need = Counter(k for g in creates for k in set(g["flow"]))
    held = Counter({"a": 1})
    return len(set(ids)) == len(ids) and all(
        held[k] + need[k] <= g["limit"] for g in creates for k in g["flow"]
    )


@_twin_settings
@given(creates=st.lists(_roomy, min_size=2, max_size=8))
async def test_gated_creates_with_room_for_all_are_claimed_as_a_set_as_alone(
    twins: tuple[FlowKeeper, FlowKeeper], creates: list[dict[str, Any]]
) -> None:
    merged, alone = twins
    results = {}
    for fk in (merged, alone):
        store, s = fk.store, fk.store.schema
        await store.ensure_schema()
        async with fk.db.acquire() as conn:
            await conn.execute(f"TRUNCATE {s}.runs, {s}.rate_limits CASCADE")
        first = {"id": 0, "key": "k", "flow": ["a"], "limit": 5, "rate": [], "priority": 0,
                 "input": "null"}  # fmt: skip
        await store._call("fetchrow", "create_gated_run", *_gated_args(store, first))
        writes = [_gated_args(store, g) for g in creates]
        # Calls of create_gated_lean (pending counts: taken before and after).
        count = (
            "SELECT coalesce(sum(calls), 0) FROM pg_stat_xact_user_functions "
            "WHERE schemaname = $1 AND funcname = 'create_gated_lean'"
        )
        async with fk.db.acquire() as conn, conn.transaction():
            await conn.execute("SET LOCAL track_functions = 'pl'")
            before = await conn.fetchval(count, s)
            if fk is merged:
                rows = await store._create_gated_many(conn, writes)
            else:
                rows = [await conn.fetchrow(store.q["create_gated_run"], *w) for w in writes]
            calls = await conn.fetchval(count, s) - before
        if fk is merged:
            # The set path calls create_gated for none of them; else for each.
            assert calls == (0 if _room_for_all(creates) else len(creates))
        shown = [
            (r["outcome"], r["id"], r["workflow"], r["step_key"], r["step_attempt"],
             r["invocations"], r["lost_attempts"], r["parent_id"], r["db_now"] is None)
            for r in rows
        ]  # fmt: skip
        results[fk is merged] = (shown, await _gated_tables(fk))
    assert results[True] == results[False]


def test_a_merged_statement_stops_growing_past_its_byte_cap() -> None:
    # Large values of many runs at once: each merged statement holds at most
    # MERGE_BYTES of them (one bind message the driver and the server hold
    # whole), and a write larger than that goes alone.
    from flowkeeper.store import MERGE_BYTES

    third = "x" * (MERGE_BYTES // 3)
    runs = [uuid.uuid4() for _ in range(6)]
    writes = [
        _plan("create_claimed_run", runs[0], third),
        _plan("create_claimed_run", runs[1], third),
        _plan("commit_lean", runs[2], inputs=[third], outputs=[b"y" * MERGE_BYTES]),  # alone
        _plan("commit_lean", runs[3], outputs=[third, third]),
        _plan("commit_lean", runs[4], third),
        _plan("commit_lean", runs[5], '"small"'),
    ]
    assert list(_statements(writes)) == [
        ("create_claimed_many", [0, 1]),
        ("commit_lean", [2]),
        ("commit_lean_many", [3, 4]),
        ("commit_lean", [5]),
    ]
