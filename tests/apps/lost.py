"""Workflows whose steps end their own process, run one invocation per process.

``python -m tests.apps.lost RUN_ID`` advances the run once in this process (as
an endpoint invocation would) and exits; a step that calls ``os._exit`` or
SIGKILLs itself takes the process with it, mid-step, writing nothing.  Every
execution of a step body is logged into ``lost_log`` first, from its own
connection, so the test can count them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import asyncpg

from flowkeeper import Context, FlowKeeper, RetryPolicy

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS lost_log (
    id bigserial PRIMARY KEY,
    run_id uuid NOT NULL,
    key text NOT NULL,
    pid integer NOT NULL
)
"""

RETRY = RetryPolicy(max_attempts=3, initial_delay=0, jitter=0)


async def log(run_id: str, key: str) -> int:
    conn = await asyncpg.connect(os.environ["DATABASE_URL"])
    try:
        return int(
            await conn.fetchval(
                "INSERT INTO lost_log (run_id, key, pid) VALUES ($1, $2, $3) "
                "RETURNING (SELECT count(*) FROM lost_log WHERE run_id = $1 AND key = $2) + 1",
                run_id,
                key,
                os.getpid(),
            )
        )
    finally:
        await conn.close()


async def deadly(run_id: str, how: str, survive_after: int) -> str:
    executions = await log(run_id, "deadly")
    if survive_after and executions > survive_after:
        return f"survived on execution {executions}"
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(17)


def deadly_sync(run_id: str) -> str:
    asyncio.run(log(run_id, "deadly-sync"))
    os._exit(18)


async def chatty_then_dies(ctx: Context, run_id: str) -> str:
    executions = await log(run_id, "chatty")
    await ctx.publish("progress", {"execution": executions, "pid": os.getpid()})
    if executions == 1:
        await asyncio.sleep(0.1)  # the message is written (batched), then the process dies
        os._exit(19)
    return "done"


async def lost(ctx: Context, spec: dict[str, object]) -> str:
    await ctx.step("before", lambda: "fine")
    how = str(spec.get("how", "exit"))
    if how == "stream":
        return await ctx.step("chatty", chatty_then_dies, ctx, ctx.run_id)
    if how == "sync":
        return await ctx.step("deadly-sync", deadly_sync, ctx.run_id)
    return await ctx.step("deadly", deadly, ctx.run_id, how, int(str(spec.get("survive_after", 0))))


def make_fk() -> FlowKeeper:
    fk = FlowKeeper(lease=float(os.environ.get("FAULT_LEASE", "0.5")), default_retry=RETRY)
    fk.workflow("lost")(lost)
    return fk


async def main(run_id: str) -> None:
    fk = make_fk()
    try:
        await fk.advance(run_id)
    finally:
        await fk.aclose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
