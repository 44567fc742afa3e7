"""The README's `useChat` page, as an app would ship it: its jsx bundled by esbuild with the real
`ai`, `@ai-sdk/react` and React packages of tests/js, next to the README's FastAPI routes, served
by uvicorn on a loopback port (for tests/test_ai_sdk.py)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvicorn

from jobstream.routes.ops import static_dir
from tests.helpers import readme_block

SECTION = "## `useChat` (AI SDK) on jobstream"
NODE_MODULES = Path(__file__).resolve().parent / "js" / "node_modules"
ESBUILD = NODE_MODULES / ".bin" / "esbuild"

#: What mounts the README's component: the chat id comes from the page's ?chat= query.
ENTRY = """import { createRoot } from "react-dom/client";
import { Chat } from "./chat.jsx";

const chatId = new URLSearchParams(location.search).get("chat");
createRoot(document.getElementById("root")).render(<Chat chatId={chatId} />);
"""

PAGE = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>chat</title><link rel="icon" href="data:,"></head>
<body><div id="root"></div><script type="module" src="/bundle.js"></script></body>
</html>
"""


def bundle_chat_page(workdir: Path, gateway_url: str) -> Path:
    """The README's jsx block as chat.jsx, with the gateway's ai-sdk.js beside it, bundled with its
    entry into one ES module for the browser; its path. ``gateway_url`` is the
    NEXT_PUBLIC_JOBSTREAM_URL the page is built with."""
    for package in ("ai", "@ai-sdk/react", "react", "react-dom", "esbuild"):
        if not (NODE_MODULES / package).is_dir():
            raise AssertionError(f"npm package {package} is missing: run `make test` (npm ci in tests/js)")
    (workdir / "chat.jsx").write_text(readme_block(SECTION, "jsx"))
    shutil.copyfile(static_dir() / "ai-sdk.js", workdir / "ai-sdk.js")
    (workdir / "entry.jsx").write_text(ENTRY)
    out = workdir / "bundle.js"
    command = [
        str(ESBUILD),
        "entry.jsx",
        "--bundle",
        "--format=esm",
        "--jsx=automatic",
        f"--define:process.env.NEXT_PUBLIC_JOBSTREAM_URL={json.dumps(gateway_url)}",
        '--define:process.env.NODE_ENV="production"',
        f"--outfile={out}",
        "--log-level=warning",
    ]
    # The bundle's imports are found in tests/js's packages, wherever workdir is.
    env = {**os.environ, "NODE_PATH": str(NODE_MODULES)}
    built = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, f"esbuild failed:\n{built.stderr}"
    return out


class HeldAnswers:
    """ASGI middleware: while ``release`` is clear, answers to ``POST path`` wait before they are
    sent (what the route does, creating a job, is done meanwhile): a slow app, on demand."""

    def __init__(self, app: Any, path: str) -> None:
        self.app = app
        self.path = path
        self.release = threading.Event()
        self.release.set()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return

        async def held(message: Any) -> None:
            if message["type"] == "http.response.start" and not self.release.is_set():
                await asyncio.to_thread(self.release.wait)
            await send(message)

        await self.app(scope, receive, held)


class AppServer:
    """An ASGI app served by uvicorn on ``port`` in a thread with its own event loop; ``on_exit``
    runs in that loop once the server has stopped (to close the app's clients)."""

    def __init__(self, app: Any, port: int, on_exit: Callable[[], Awaitable[None]] | None = None) -> None:
        self.app = app
        self.port = port
        self.on_exit = on_exit
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: uvicorn.Server | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> AppServer:
        self._thread.start()
        if not self._ready.wait(15):
            raise RuntimeError("the app did not start")
        return self

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        serve = asyncio.create_task(self._server.serve())
        while not self._server.started and not serve.done():
            await asyncio.sleep(0.01)
        self._ready.set()
        try:
            await serve
        finally:
            if self.on_exit is not None:
                await self.on_exit()

    def stop(self) -> None:
        if self._server is not None and self._loop is not None:
            server = self._server
            self._loop.call_soon_threadsafe(lambda: setattr(server, "should_exit", True))
        self._thread.join(15)
