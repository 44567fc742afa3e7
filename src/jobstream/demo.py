"""Built-in job types for trying jobstream out: ``demo.story`` and ``demo.fail``."""

from __future__ import annotations

import asyncio
import random

from pydantic import BaseModel, ConfigDict, Field

from jobstream.producer import JobContext, JobFailed
from jobstream.registry import handler

_WORDS = (
    "the quick brown fox jumps over a lazy dog while a patient river carries small boats past quiet "
    "villages and the evening light settles on roofs gardens and long roads that lead somewhere new"
).split()


class StoryInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    words: int = Field(50, ge=1, le=10000)
    delay_ms: int = Field(50, ge=0, le=10000)


class FailInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    after: int = Field(3, ge=0, le=10000)
    delay_ms: int = Field(20, ge=0, le=10000)


def _word(index: int, rng: random.Random) -> str:
    word = rng.choice(_WORDS)
    return word.capitalize() if index == 0 else " " + word


def story_text(job_id: str, words: int) -> str:
    """The whole text demo.story writes for this job (its words are seeded by the job id)."""
    rng = random.Random(job_id)
    return "".join(_word(index, rng) for index in range(words))


@handler("demo.story", idempotent=True)
async def story(ctx: JobContext, input: StoryInput) -> dict[str, int]:
    """Writes ``words`` words, one delta each (flushed per word, as a model streaming tokens), with progress."""
    rng = random.Random(ctx.job_id)
    step = max(1, input.words // 10)
    for index in range(input.words):
        await ctx.delta(_word(index, rng))
        await ctx.flush()
        if (index + 1) % step == 0 or index + 1 == input.words:
            await ctx.progress(index + 1, input.words, f"{index + 1} of {input.words} words")
        await asyncio.sleep(input.delay_ms / 1000)
    return {"words": input.words}


@handler("demo.fail")
async def fail(ctx: JobContext, input: FailInput) -> None:
    """Writes ``after`` deltas, then fails."""
    rng = random.Random(ctx.job_id)
    for index in range(input.after):
        await ctx.delta(_word(index, rng))
        await ctx.flush()
        await asyncio.sleep(input.delay_ms / 1000)
    raise JobFailed(f"demo.fail failed on purpose after {input.after} deltas")
