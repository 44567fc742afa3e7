"""Job types used by the tests (also loaded by worker processes the tests start, via --app)."""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel

from jobstream import JobContext, JobFailed, handler


class EchoInput(BaseModel):
    events: list[dict[str, Any]] = []
    result: dict[str, Any] | None = None


@handler("test.echo")
async def echo(ctx: JobContext, input: EchoInput) -> dict[str, Any] | None:
    for event in input.events:
        await ctx.emit(event["type"], event.get("data", {}))
    return input.result


class SlowInput(BaseModel):
    steps: int = 100
    step_ms: int = 100


async def _slow(ctx: JobContext, input: SlowInput) -> dict[str, int]:
    for step in range(input.steps):
        await ctx.delta(f"{step} ")
        await ctx.flush()
        await asyncio.sleep(input.step_ms / 1000)
    return {"steps": input.steps}


handler("test.slow")(_slow)
handler("test.slow_idempotent", idempotent=True)(_slow)


@handler("test.boom")
async def boom(ctx: JobContext, input: dict[str, Any]) -> None:
    await ctx.delta("about to fail")
    raise RuntimeError("secret internal detail: password=hunter2")


@handler("test.refuse")
async def refuse(ctx: JobContext, input: dict[str, Any]) -> None:
    raise JobFailed("the data could not be read")


class TokensInput(BaseModel):
    count: int = 500


@handler("test.tokens")
async def tokens(ctx: JobContext, input: TokensInput) -> None:
    """One tiny delta per call with no pause, like a model streaming tokens."""
    for index in range(input.count):
        await ctx.delta(f"t{index} ")


@handler("test.timeout", timeout_s=0.3)
async def too_slow(ctx: JobContext, input: dict[str, Any]) -> None:
    await asyncio.sleep(5)


@handler("report.build")
async def report_build(ctx: JobContext, input: dict[str, Any]) -> dict[str, Any]:
    """The job type of the README's FastAPI example (tests/test_readme_examples.py)."""
    for word in ("Sales", "rose", "in", "May."):
        await ctx.delta(word + " ")
    return {"pages": 1, "user_id": input.get("user_id")}


@handler("test.agent")
async def agent(ctx: JobContext, input: dict[str, Any]) -> dict[str, Any]:
    """An agent's turn: reasoning token by token, a tool call and its result, then the answer."""
    for token in ("Need ", "the ", "weather."):
        await ctx.reasoning(token)
    await ctx.tool_call("call-1", "weather", {"city": "Oslo"})
    await ctx.tool_result("call-1", {"celsius": 4})
    await ctx.tool_call("call-2", "news", {})
    await ctx.tool_result("call-2", error="news service down")
    for token in ("It is ", "4 °C."):
        await ctx.delta(token)
    return {"answer": 4}
