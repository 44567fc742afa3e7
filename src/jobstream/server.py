"""Running gateways: one uvicorn server class with jobstream's shutdown, in every launch mode.

On SIGTERM (or SIGINT) a gateway first ends its open event streams and waiting long-polls (the
streams with a retry hint, so that EventSource reconnects, to another gateway, from its last id),
then lets uvicorn close what is left and exit. uvicorn alone would keep streaming until its
graceful timeout and then cut the streams mid-body. `serve`, `dev` and each process of
`serve --workers N` all run `GatewayServer`, so they all shut down the same way.

`serve --workers N` is a small supervisor rather than uvicorn's own: uvicorn's worker processes
build a stock ``uvicorn.Server``, whose signal handler cannot reach the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from multiprocessing.process import BaseProcess
from types import FrameType

import uvicorn
from starlette.applications import Starlette
from uvicorn.config import STARTUP_FAILURE

from jobstream.app import begin_shutdown

logger = logging.getLogger("jobstream.server")

EXIT_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: How often the supervisor looks for gateway processes that died.
SUPERVISE_EVERY_S = 0.5


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


def bind(host: str, port: int) -> socket.socket:
    """The listening socket the gateway processes of `serve --workers N` share."""
    return uvicorn.Config("jobstream", host=host, port=port).bind_socket()


def supervise(start: Callable[[], BaseProcess], processes: int, grace_s: float) -> None:
    """Run ``processes`` gateway processes, replace any that dies, and on SIGINT/SIGTERM pass the
    signal on and wait for them (up to ``grace_s`` and a margin, then kill)."""
    stop = threading.Event()
    for sig in EXIT_SIGNALS:
        signal.signal(sig, lambda *_: stop.set())
    running = [start() for _ in range(processes)]
    while not stop.wait(SUPERVISE_EVERY_S):
        for index, process in enumerate(running):
            if process.is_alive():
                continue
            if process.exitcode == STARTUP_FAILURE:
                logger.error("gateway process %s failed to start: stopping", process.pid)
                stop.set()
                break
            logger.warning("gateway process %s exited with %s: starting another", process.pid, process.exitcode)
            running[index] = start()
    _stop_all(running, grace_s + 5)
    if any(process.exitcode == STARTUP_FAILURE for process in running):
        raise SystemExit(STARTUP_FAILURE)


def _stop_all(running: list[BaseProcess], timeout_s: float) -> None:
    for process in running:
        if process.is_alive() and process.pid is not None:
            os.kill(process.pid, signal.SIGTERM)
    for process in running:
        process.join(timeout_s)
        if process.is_alive():
            logger.warning("gateway process %s did not stop in time: killed", process.pid)
            process.kill()
            process.join()


def spawn(target: Callable[..., None], *args: object) -> BaseProcess:
    """A fresh interpreter (not a fork of the supervisor's), as uvicorn's own workers are."""
    process = multiprocessing.get_context("spawn").Process(target=target, args=args)
    process.start()
    return process
