"""The supervisor of `serve --workers N`: N gateway processes on one listening socket.

uvicorn's own supervisor builds a stock ``uvicorn.Server`` in each worker process, whose signal
handler cannot reach the app; here each process runs `serve`'s own code (``server.GatewayServer``)
on the shared socket, so it shuts down like `serve` does.

- A process that dies is replaced, after a delay that doubles while replacements keep dying soon
  after they start (a bad setting, Redis down at start-up): no restart storm.
- The supervisor gives up only when every process keeps dying at start-up; a replacement that
  fails never stops the processes that serve.
- The processes die with the supervisor (Linux's parent-death signal), so a killed supervisor
  leaves no gateway holding the port.
- SIGINT or SIGTERM: each process gets SIGTERM and the whole shutdown grace, together.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess

import uvicorn
from prometheus_client import multiprocess

from jobstream import metrics
from jobstream.devredis import die_with_parent

logger = logging.getLogger("jobstream.supervisor")

EXIT_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: How often the supervisor looks for processes that died.
SUPERVISE_EVERY_S = 0.5
#: A process that dies sooner than this after its start failed to start.
QUICK_EXIT_S = 10.0
#: Replacements wait this long after a failed start, doubling up to RESTART_MAX_S.
RESTART_BASE_S = 0.5
RESTART_MAX_S = 30.0
#: Failed starts in a row, with no process left serving, after which the supervisor gives up.
MAX_FAILED_STARTS = 4
#: Exit status of `serve --workers N` when its processes cannot start.
STARTUP_FAILURE = 3


@dataclass
class _Slot:
    process: BaseProcess
    started_at: float = field(default_factory=time.monotonic)
    failed_starts: int = 0
    restart_at: float | None = None


def supervise(start: Callable[[], BaseProcess], processes: int, grace_s: float) -> None:
    """Run ``processes`` processes made by ``start`` until SIGINT/SIGTERM (see the module docstring)."""
    stop = threading.Event()
    for sig in EXIT_SIGNALS:
        signal.signal(sig, lambda *_: stop.set())
    slots = [_Slot(start()) for _ in range(processes)]
    while not stop.wait(SUPERVISE_EVERY_S):
        for slot in slots:
            _tend(slot, start)
        if all(slot.failed_starts >= MAX_FAILED_STARTS and not slot.process.is_alive() for slot in slots):
            logger.error("gateway processes keep failing at start-up: stopping")
            stop.set()
            _stop_all(slots, grace_s + 5)
            raise SystemExit(STARTUP_FAILURE)
    _stop_all(slots, grace_s + 5)


def _tend(slot: _Slot, start: Callable[[], BaseProcess]) -> None:
    """Notice a dead process and schedule its replacement; start it when its delay is over."""
    now = time.monotonic()
    if slot.restart_at is None:
        if slot.process.is_alive():
            if now - slot.started_at >= QUICK_EXIT_S:
                slot.failed_starts = 0  # it served: the next death is not a start-up failure
            return
        _forget_metrics(slot.process)
        quick = now - slot.started_at < QUICK_EXIT_S
        slot.failed_starts = slot.failed_starts + 1 if quick else 0
        delay_s = min(RESTART_BASE_S * 2**slot.failed_starts, RESTART_MAX_S) if quick else 0.0
        logger.warning(
            "gateway process %s exited with %s: another in %.1fs", slot.process.pid, slot.process.exitcode, delay_s
        )
        slot.restart_at = now + delay_s
    if now >= slot.restart_at:
        slot.process, slot.started_at, slot.restart_at = start(), now, None


def _forget_metrics(process: BaseProcess) -> None:
    # A dead process's gauges (open streams) must not stay in the sums any process answers.
    if process.pid is not None and metrics.MULTIPROC_DIR_ENV in os.environ:
        multiprocess.mark_process_dead(process.pid)  # type: ignore[no-untyped-call]


def _stop_all(slots: list[_Slot], timeout_s: float) -> None:
    """SIGTERM to every process at once, then one deadline for all of them before SIGKILL."""
    for slot in slots:
        if slot.process.is_alive() and slot.process.pid is not None:
            os.kill(slot.process.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for slot in slots:
        slot.process.join(max(0.0, deadline - time.monotonic()))
        if slot.process.is_alive():
            logger.warning("gateway process %s did not stop in time: killed", slot.process.pid)
            slot.process.kill()
            slot.process.join()


def bind(host: str, port: int) -> socket.socket:
    """The listening socket the processes share (bound here, once, as uvicorn does)."""
    return uvicorn.Config("jobstream", host=host, port=port).bind_socket()


def spawn(target: Callable[..., None], *args: object) -> BaseProcess:
    """A fresh interpreter (not a fork of the supervisor's), as uvicorn's own workers are."""
    process = multiprocessing.get_context("spawn").Process(target=target, args=args)
    process.start()
    return process


def become_child(supervisor_pid: int) -> None:
    """First thing in a supervised process: die with the supervisor, and leave a terminal's Ctrl-C
    to the supervisor (which passes SIGTERM on) until the server handles signals itself."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if os.getppid() != supervisor_pid:  # it died before the line above took effect
        raise SystemExit(0)
