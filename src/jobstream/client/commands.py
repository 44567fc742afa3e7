"""`jobstream tail` and `jobstream submit`: follow a job from a terminal or a script.

Deltas go to stdout as they arrive (``--json``: every event, one JSON object a line); progress
goes to stderr when stderr is a terminal and stdout is not (on one terminal it would cut the text
apart). Exit status: 0 completed, 1 failed, 3 cancelled, 2 usage or configuration, 4 any other
error, 130 Ctrl-C. An error is one line on stderr."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from typing import Any, TextIO

import httpx

from jobstream.client.errors import ClientError, FollowError
from jobstream.client.follow import TRANSPORTS
from jobstream.client.models import Event
from jobstream.client.sync import Client

EXIT_CODES = {"completed": 0, "failed": 1, "cancelled": 3}
EXIT_USAGE = 2
EXIT_ERROR = 4
EXIT_INTERRUPTED = 130
COMMANDS = ("tail", "submit")


class UsageError(Exception):
    """The command line or the environment is incomplete."""


def add_commands(commands: Any) -> None:
    """Add ``tail`` and ``submit`` to the subparsers of the ``jobstream`` command."""
    tail = commands.add_parser("tail", help="follow a job's output")
    tail.add_argument("job_id")
    submit = commands.add_parser("submit", help="create a job and print its id")
    submit.add_argument("type")
    submit.add_argument("--input", default=None, help="the job's input, as JSON")
    submit.add_argument("--ttl", type=int, default=None, help="idle timeout in seconds")
    submit.add_argument("--tag", action="append", default=None, help="a tag (repeatable)")
    submit.add_argument("--follow", action="store_true", help="then follow it, as tail does")
    for cmd in (tail, submit):
        cmd.add_argument("--json", action="store_true", help="every event, one JSON object a line")
        cmd.add_argument("--transport", choices=TRANSPORTS, default="auto")
        cmd.add_argument("--url", default=None, help="gateway URL (default: $JOBSTREAM_URL)")
        cmd.add_argument("--key", default=None, help="API key (default: $JOBSTREAM_API_KEY)")
        cmd.add_argument("--token", default=None, help="a JWT or read token instead of an API key")


def run(args: argparse.Namespace) -> int:
    """Run ``tail`` or ``submit``; the exit status."""
    printer = Printer(sys.stdout, as_json=args.json)
    try:
        with _client(args) as client:
            if args.command == "submit":
                job_id = client.create(args.type, _input(args.input), ttl=args.ttl, tags=args.tag).id
                print(job_id, flush=True)
                if not args.follow:
                    return 0
            else:
                job_id = client.get(args.job_id).id  # a wrong id, key or URL fails here, at once
            status = printer.show(client.follow(job_id, transport=args.transport))
            if status is None:
                status = client.get(job_id).status  # ended before this follow: only its status is left
            return EXIT_CODES.get(status, EXIT_ERROR)
    except KeyboardInterrupt:
        printer.finish()
        return EXIT_INTERRUPTED
    except UsageError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except (ClientError, httpx.HTTPError, TimeoutError) as exc:
        printer.finish()
        _error(_describe(exc))
        return EXIT_ERROR


def _client(args: argparse.Namespace) -> Client:
    url = args.url or os.environ.get("JOBSTREAM_URL")
    if not url:
        raise UsageError("no gateway URL: pass --url or set JOBSTREAM_URL")
    key = args.key or (None if args.token else os.environ.get("JOBSTREAM_API_KEY"))
    if key and args.token:
        raise UsageError("pass --key or --token, not both")
    try:
        return Client(url, api_key=key or None, token=args.token)
    except (ValueError, httpx.InvalidURL) as exc:
        raise UsageError(f"bad gateway URL {url!r}: {exc}") from exc


def _input(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UsageError(f"--input is not JSON: {exc}") from exc


class Printer:
    """Writes events to stdout as they arrive, remembering whether its text left a line open."""

    def __init__(self, out: TextIO, *, as_json: bool) -> None:
        self.out = out
        self.as_json = as_json
        self.progress = sys.stderr.isatty() and not out.isatty()
        self.open_line = False

    def show(self, events: Iterable[Event]) -> str | None:
        """Write each event; the job's final status, if a ``done`` came."""
        status: str | None = None
        for event in events:
            self.write(event)
            if event.type == "done" and isinstance(event.data, dict):
                status = str(event.data.get("status"))
        self.finish()
        return status

    def write(self, event: Event) -> None:
        data = event.data if isinstance(event.data, dict) else {}
        if self.as_json:
            self.out.write(json.dumps(event.model_dump(), ensure_ascii=False) + "\n")
        elif event.type == "delta":
            chunk = str(data.get("text", ""))
            if chunk:  # before the write: a Ctrl-C right after it must still end the line
                self.open_line = not chunk.endswith("\n")
            self.out.write(chunk)
        elif event.type == "failure":
            self.finish()
            _error(f"job failed: {data.get('message', '')}")
        elif event.type == "truncated":
            self.clear_progress()  # the message on a line of its own; the text on stdout goes on
            _error("the oldest events were trimmed away; continuing from the oldest kept")
        self.out.flush()
        if self.progress and event.type == "progress":
            sys.stderr.write(f"\r\x1b[2K{_progress_line(data)}")
            sys.stderr.flush()

    def finish(self) -> None:
        """End the text's line, and clear the progress line."""
        self.clear_progress()
        if self.open_line:
            self.out.write("\n")
            self.out.flush()
            self.open_line = False

    def clear_progress(self) -> None:
        """Clear the progress line (when progress is shown at all)."""
        if self.progress:
            sys.stderr.write("\r\x1b[2K")
            sys.stderr.flush()


def _progress_line(data: dict[str, Any]) -> str:
    percent = data.get("percent")
    message = data.get("message") or ""
    return f"{percent:.0f}% {message}".strip() if isinstance(percent, int | float) else str(message)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, FollowError) and isinstance(exc.last_error, httpx.TransportError):
        return f"lost the gateway: {exc}"
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return f"cannot reach the gateway: {exc}"
    if isinstance(exc, TimeoutError):
        return str(exc) or "timed out"
    return str(exc) or type(exc).__name__


def _error(message: str) -> None:
    line = " ".join(message.split())  # one line, whatever the server or the network said
    print(f"jobstream: {line}", file=sys.stderr, flush=True)
