"""Running gateways: one uvicorn server class with jobstream's shutdown, in every launch mode.

On SIGTERM (or SIGINT) a gateway first ends its open event streams (cleanly: EventSource then
reconnects, to another gateway, from its last id) and answers its waiting long-polls, then lets
uvicorn close what is left and exit. uvicorn alone would keep streaming until its
graceful timeout and then cut the streams mid-body. `serve`, `dev` and each process of
`serve --workers N` all run `GatewayServer`, so they all shut down the same way.

`serve --workers N` runs this server in each of its processes (``supervisor``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType

import uvicorn
from starlette.applications import Starlette

from jobstream.app import begin_shutdown

logger = logging.getLogger("jobstream.server")

EXIT_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GatewayServer(uvicorn.Server):
    """uvicorn, ending the app's streams as soon as the exit signal arrives."""

    def __init__(self, config: uvicorn.Config, app: Starlette, on_exit: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self._app = app
        self._on_exit = on_exit

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # In the loop rather than uvicorn's signal.signal: the handler then runs where waking the
        # readers is safe. And no re-raise of the signal at the end (uvicorn's way): the process
        # exits 0 after a clean shutdown instead of dying by the signal.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        loop = asyncio.get_running_loop()
        for sig in EXIT_SIGNALS:
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in EXIT_SIGNALS:
                loop.remove_signal_handler(sig)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        begin_shutdown(self._app)
        if self._on_exit is not None:
            self._on_exit()
