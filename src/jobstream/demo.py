"""Built-in job types for trying jobstream out: ``demo.story``, ``demo.fail`` and ``demo.chat``.

They register in a registry of their own, `demo_registry`, which a gateway or worker serves only
when JOBSTREAM_DEMO is on (`jobstream dev` turns it on): importing this module enables nothing.
Their inputs are bounded and every run ends within `DEMO_TIMEOUT_S`, so that a demo job can never
hold a worker for long.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from jobstream.producer import JobContext, JobFailed
from jobstream.registry import HandlerFunc, Registry, handler

#: The demo job types; see `jobstream.registry.registry_for`.
demo_registry = Registry()
#: Longest run of a demo job: a handler still running then fails with a timeout.
DEMO_TIMEOUT_S = 300
MAX_WORDS = 5000
MAX_DELAY_MS = 2000

_WORDS = (
    "the quick brown fox jumps over a lazy dog while a patient river carries small boats past quiet "
    "villages and the evening light settles on roofs gardens and long roads that lead somewhere new"
).split()


class StoryInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    words: int = Field(50, ge=1, le=MAX_WORDS)
    delay_ms: int = Field(50, ge=0, le=MAX_DELAY_MS)


class FailInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    after: int = Field(3, ge=0, le=MAX_WORDS)
    delay_ms: int = Field(20, ge=0, le=MAX_DELAY_MS)


#: The longest user message demo.chat answers (longer ones are cut).
MAX_CHAT_TEXT = 4000


class ChatInput(BaseModel):
    """What an app passes on from the AI SDK's `useChat`: the chat's UI messages."""

    model_config = ConfigDict(extra="ignore")

    messages: list[dict[str, Any]] = Field(default_factory=list, max_length=1000)
    delay_ms: int = Field(20, ge=0, le=MAX_DELAY_MS)


def chat_reply(messages: list[dict[str, Any]]) -> str:
    """demo.chat's whole reply: ``You said: `` and the last user message's text."""
    said = ""
    for message in reversed(messages):
        if message.get("role") == "user":
            parts = message.get("parts")
            said = "".join(
                str(part.get("text", ""))
                for part in (parts if isinstance(parts, list) else [])
                if isinstance(part, dict) and part.get("type") == "text"
            )
            break
    return f"You said: {said[:MAX_CHAT_TEXT]}"


def demo_handler(name: str, *, idempotent: bool = False) -> Callable[[HandlerFunc], HandlerFunc]:
    """``@handler`` for a demo job type: in `demo_registry`, with the demo timeout."""
    return handler(name, idempotent=idempotent, timeout_s=DEMO_TIMEOUT_S, registry=demo_registry)


def _word(index: int, rng: random.Random) -> str:
    word = rng.choice(_WORDS)
    return word.capitalize() if index == 0 else " " + word


def story_text(job_id: str, words: int) -> str:
    """The whole text demo.story writes for this job (its words are seeded by the job id)."""
    rng = random.Random(job_id)
    return "".join(_word(index, rng) for index in range(words))


@demo_handler("demo.story", idempotent=True)
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


@demo_handler("demo.fail")
async def fail(ctx: JobContext, input: FailInput) -> None:
    """Writes ``after`` deltas, then fails."""
    rng = random.Random(ctx.job_id)
    for index in range(input.after):
        await ctx.delta(_word(index, rng))
        await ctx.flush()
        await asyncio.sleep(input.delay_ms / 1000)
    raise JobFailed(f"demo.fail failed on purpose after {input.after} deltas")


# Not idempotent: a second run would write its whole reply again after the first's start.
@demo_handler("demo.chat")
async def chat(ctx: JobContext, input: ChatInput) -> dict[str, int]:
    """Answers a chat's last user message, word by word, as a model streams its reply."""
    words = chat_reply(input.messages).split(" ")
    for index, word in enumerate(words):
        await ctx.delta(word if index == 0 else " " + word)
        await ctx.flush()
        await asyncio.sleep(input.delay_ms / 1000)
    return {"words": len(words)}
