"""ctx.idempotency_key: stable per (run, step key) across attempts and replays."""

from __future__ import annotations

from collections import defaultdict

from flowkeeper import Context, FlowKeeper, RetryPolicy, StepUsageError, current_step

from ..helpers import drive, serve

FAST = RetryPolicy(max_attempts=3, initial_delay=0.01, max_delay=0.01)


async def test_same_key_on_every_attempt_and_replay_different_per_occurrence(
    fk: FlowKeeper,
) -> None:
    seen: dict[str, list[tuple[str, int]]] = defaultdict(list)

    def charge(ctx: Context, fail_first: bool) -> str:  # a sync step: its thread sees it too
        step = current_step()
        seen[step.step_key].append((ctx.idempotency_key, step.attempt))
        if fail_first and step.attempt == 1:
            raise RuntimeError("the provider timed out")
        return ctx.idempotency_key

    async def acharge(ctx: Context) -> str:
        return ctx.idempotency_key

    @fk.workflow("keys")
    async def keys(ctx: Context) -> list[str]:
        out = [await ctx.step("charge", charge, ctx, i == 0, retry=FAST) for i in range(3)]
        out.append(await ctx.step("async-charge", acharge, ctx))
        return out

    async with serve(fk):
        run_id = (await fk.trigger("keys")).run_id
        await drive(fk, [run_id])
        first = await fk.result(run_id, timeout=10)
        assert len(set(first)) == 4  # one key per loop occurrence
        assert all(k.startswith(run_id) and k.isascii() and len(k) <= 255 for k in first)
        # Two attempts of the first charge, one key.
        assert [a for _, a in seen["charge"]] == [1, 2]
        assert len({k for k, _ in seen["charge"]}) == 1
        await fk.replay(run_id, from_step="charge")
        await drive(fk, [run_id])
        assert await fk.result(run_id, timeout=10) == first  # the same keys on the replay
        other = (await fk.trigger("keys")).run_id
        await drive(fk, [other])
        assert not set(await fk.result(other, timeout=10)) & set(first)  # another run


async def test_outside_a_step_is_a_usage_error(fk: FlowKeeper) -> None:
    @fk.workflow("no-step")
    async def no_step(ctx: Context) -> str:
        return ctx.idempotency_key

    async with serve(fk):
        run_id = (await fk.trigger("no-step")).run_id
        assert (await drive(fk, [run_id]))[run_id] == "failed"
        info = await fk.get_run(run_id)
        assert info.error is not None
        assert info.error["type"] == StepUsageError.__module__ + ".StepUsageError"
        assert "inside a step" in info.error["message"]
