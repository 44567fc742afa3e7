"""Load generator: raw asyncio sockets on uvloop, so that it is not the bottleneck.

Modes (one process each, started by ``bench/run.py``; prints one JSON line of results):

- ``sse``: open every given SSE path (one connection each), print ``READY`` once all answered,
  read the window's start (epoch seconds) from stdin, then count the events the publisher stamped
  (``"t"``) inside the window ``[start, start + seconds)``, waiting ``GRACE_S`` after it for late
  ones: per-connection sequence checks (gaps, duplicates) and append-to-receive latency. With
  ``--many``, each path is a many-jobs stream (``GET /v1/events?jobs=a,b,...``): every event's data
  is ``{"job_id","id","data"}``, so the checks are per job of each connection (sequence numbers,
  and the event ids strictly increasing), and at the end each connection's last SSE ``id:`` (the
  opaque cursor) is decoded with the gateway's own ``multicursor`` and compared, job by job, with
  the last event received (``cursor_mismatches``).
- ``idle``: open every path, print ``READY``, hold the connections until stdin closes.
- ``poll``: each path is polled in a loop (``wait`` in the path makes it a long-poll).
- ``interval``: each path is polled once every ``--interval`` s from the client's last position:
  the hub's ``after=<next>`` (``--flavor hub``), or Nchan's ``If-None-Match``/``If-Modified-Since``
  from its last answer (``--flavor nchan``). Prints ``READY`` once every client is connected, reads
  the window's start (epoch seconds) from stdin and polls from then on; requests sent inside the
  window ``[start, start + seconds)`` are counted, with their latency, the events they brought
  (sequence checks per client) and each event's age on arrival.
- ``create``: POST creates at a fixed rate and measure each latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import resource
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import uvloop

#: An event's sequence number and publishing time: ``"seq":N,"t":T`` in the event's JSON data, or
#: ``seq=N t=T`` inside a delta's text (what run.py's HTTP publisher appends to jobstream).
_EVENT = re.compile(rb'seq"?[:=](\d+)[, ]"?t"?[:=](\d+)')
#: How long after the window events published inside it may still arrive and count.
GRACE_S = 2.0
#: A many-jobs stream's event: its job, its id in that job, then (in the wrapped data, on the same
#: line) its sequence number and publishing time as above.
_MANY_EVENT = re.compile(rb'"job_id":"([^"]+)","id":"(\d+)-(\d+)","data":[^\n]*?seq"?[:=](\d+)[, ]"?t"?[:=](\d+)')
#: An SSE ``id:`` line (at the start of a chunk, or after a line break).
_ID_LINE = re.compile(rb"(?:^|\n)id: ([^\n]*)\n")
_CONTENT_LENGTH = re.compile(rb"content-length: (\d+)", re.IGNORECASE)
_NEXT = re.compile(rb'"next":"([^"]*)"')
_ETAG = re.compile(rb"\r\netag: ([^\r]*)", re.IGNORECASE)
_LAST_MODIFIED = re.compile(rb"\r\nlast-modified: ([^\r]*)", re.IGNORECASE)


@dataclass
class Stats:
    deliveries: int = 0
    gaps: int = 0
    duplicates: int = 0
    errors: int = 0
    latencies_us: list[int] = field(default_factory=list)
    requests: int = 0
    counting: bool = False
    window_ns: tuple[int, int] = (0, 0)
    #: Connections that received no event of the window.
    silent: int = 0
    #: Many-jobs streams: (connection, job) pairs that received no event of the window.
    silent_jobs: int = 0
    #: Many-jobs streams: jobs whose position in the connection's last cursor is not the last
    #: event received of that job.
    cursor_mismatches: int = 0

    def summary(self, seconds: float) -> dict[str, object]:
        lat = sorted(self.latencies_us)

        def pct(p: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))] / 1000, 2) if lat else None

        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "deliveries": self.deliveries,
            "deliveries_per_s": round(self.deliveries / seconds, 1),
            "requests": self.requests,
            "requests_per_s": round(self.requests / seconds, 1),
            "gaps": self.gaps,
            "duplicates": self.duplicates,
            "errors": self.errors,
            "silent_connections": self.silent,
            "silent_job_streams": self.silent_jobs,
            "cursor_mismatches": self.cursor_mismatches,
            "latency_ms": {"p50": pct(0.50), "p99": pct(0.99), "max": round(lat[-1] / 1000, 2) if lat else None},
            "loadgen_cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
        }


async def _open(
    host: str, port: int, path: str, headers: str = ""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n{headers}\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"{path}: {head[:60]!r}")
    return reader, writer


async def _complete_lines(reader: asyncio.StreamReader, stop: asyncio.Event) -> AsyncIterator[tuple[bytes, int]]:
    """What a stream brings, up to its last complete line (a data line never spans it; frames may
    end in LF LF or CR LF CR LF): (the bytes, where that line ends)."""
    tail = b""
    while not stop.is_set():
        chunk = await reader.read(65536)
        if not chunk:
            return
        data = tail + chunk
        cut = data.rfind(b"\n")
        if cut < 0:
            tail = data
            continue
        tail = data[cut + 1 :]
        yield data, cut


async def _follow(reader: asyncio.StreamReader, stats: Stats, stop: asyncio.Event) -> None:
    last_seq = -1
    stats.silent += 1
    counted = False
    async for data, cut in _complete_lines(reader, stop):
        now_ns = time.time_ns()
        window_start, window_end = stats.window_ns
        for match in _EVENT.finditer(data, 0, cut):
            seq = int(match[1])
            if seq <= last_seq:
                stats.duplicates += 1
                continue
            if last_seq >= 0 and seq != last_seq + 1:
                stats.gaps += 1
            last_seq = seq
            stamped = int(match[2])
            if window_start <= stamped < window_end:
                if not counted:
                    counted = True
                    stats.silent -= 1
                stats.deliveries += 1
                stats.latencies_us.append((now_ns - stamped) // 1000)


def _jobs_of(path: str) -> list[str]:
    """The job ids of a many-jobs stream's path (``jobs=a,b,...``)."""
    query = path.split("?", 1)[1]
    listed = next(part for part in query.split("&") if part.startswith("jobs="))
    return listed[len("jobs=") :].split(",")


@dataclass(slots=True)
class _Job:
    """One job of a many-jobs stream: its last sequence number and event id, and if the window's
    events reached it."""

    last_seq: int = -1
    last_id: tuple[int, int] = (-1, -1)
    counted: bool = False


async def _follow_many(reader: asyncio.StreamReader, job_ids: list[str], stats: Stats, stop: asyncio.Event) -> None:
    """Read a many-jobs stream: each event checked against its own job's last (gaps and duplicates
    of the publisher's sequence numbers, and the event ids strictly increasing per job); the last
    SSE ``id:`` is checked against the jobs' last events once the stream has been read."""
    jobs = {job_id.encode(): _Job() for job_id in job_ids}
    stats.silent += 1
    stats.silent_jobs += len(jobs)
    counted = False
    last_cursor = b""
    try:
        async for data, cut in _complete_lines(reader, stop):
            now_ns = time.time_ns()
            window_start, window_end = stats.window_ns
            for match in _MANY_EVENT.finditer(data, 0, cut):
                job = jobs.get(match[1])
                if job is None:
                    stats.errors += 1  # an event of a job this connection does not follow
                    continue
                event_id = (int(match[2]), int(match[3]))
                seq = int(match[4])
                if seq <= job.last_seq or event_id <= job.last_id:
                    stats.duplicates += 1
                    continue
                if job.last_seq >= 0 and seq != job.last_seq + 1:
                    stats.gaps += 1
                job.last_seq, job.last_id = seq, event_id
                stamped = int(match[5])
                if window_start <= stamped < window_end:
                    if not counted:
                        counted = True
                        stats.silent -= 1
                    if not job.counted:
                        job.counted = True
                        stats.silent_jobs -= 1
                    stats.deliveries += 1
                    stats.latencies_us.append((now_ns - stamped) // 1000)
            ids = _ID_LINE.findall(data, 0, cut + 1)
            if ids:
                last_cursor = ids[-1]
    finally:
        # Cancelled at the end, once every event of the window had time to arrive.
        stats.cursor_mismatches += _cursor_mismatches(last_cursor, jobs)


def _cursor_mismatches(cursor: bytes, jobs: dict[bytes, _Job]) -> int:
    """Jobs whose position in the cursor is not their last event received (a job that received
    nothing must be absent from it)."""
    from jobstream.multicursor import JobsCursor  # this tree's src/ (run.py puts it on the path)

    decoded = JobsCursor.decode(cursor.decode()) if cursor else JobsCursor()
    mismatches = 0
    for job_id, job in jobs.items():
        expected = f"{job.last_id[0]}-{job.last_id[1]}" if job.last_seq >= 0 else None
        found = decoded.after(job_id.decode()) if job_id.decode() in decoded else None
        mismatches += found != expected
    return mismatches


async def sse(
    host: str, port: int, paths: list[str], seconds: float, headers: str, many: bool = False
) -> dict[str, object]:
    stats = Stats()
    stop = asyncio.Event()
    opened = []
    for start in range(0, len(paths), 200):  # connect in waves: a burst of 10,000 SYNs overflows the backlog
        opened += await asyncio.gather(*(_open(host, port, path, headers) for path in paths[start : start + 200]))
    if many:
        followers = [
            asyncio.create_task(_follow_many(reader, _jobs_of(path), stats, stop))
            for (reader, _), path in zip(opened, paths, strict=True)
        ]
    else:
        followers = [asyncio.create_task(_follow(reader, stats, stop)) for reader, _ in opened]
    print("READY", flush=True)
    start = float(await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline))
    stats.window_ns = (int(start * 1e9), int((start + seconds) * 1e9))
    await asyncio.sleep(max(0.0, start + seconds + GRACE_S - time.time()))
    elapsed = seconds
    stop.set()
    for task in followers:
        task.cancel()
    await asyncio.gather(*followers, return_exceptions=True)
    for _, writer in opened:
        writer.close()
    return stats.summary(elapsed)


async def idle(host: str, port: int, paths: list[str], headers: str) -> dict[str, object]:
    opened = []
    started = time.monotonic()
    for start in range(0, len(paths), 200):
        opened += await asyncio.gather(*(_open(host, port, path, headers) for path in paths[start : start + 200]))
    open_s = time.monotonic() - started
    print("READY", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for _, writer in opened:
        writer.close()
    return {"connections": len(opened), "open_s": round(open_s, 3)}


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = _CONTENT_LENGTH.search(head)
    body = await reader.readexactly(int(length[1])) if length else b""
    return int(head[9:12]), body


async def _poller(host: str, port: int, path: str, stats: Stats, stop: asyncio.Event, headers: str) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    while not stop.is_set():
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}\r\n".encode())
        status, _ = await _read_response(reader)
        if status != 200:
            stats.errors += 1
        if stats.counting:
            stats.requests += 1
    writer.close()


async def poll(host: str, port: int, paths: list[str], seconds: float, headers: str) -> dict[str, object]:
    stats = Stats(counting=False)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(_poller(host, port, path, stats, stop, headers)) for path in paths]
    await asyncio.sleep(1.0)  # warm up: every poller connected
    print("READY", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    stats.counting = True
    started = time.monotonic()
    await asyncio.sleep(seconds)
    stats.counting = False
    elapsed = time.monotonic() - started
    stop.set()
    await asyncio.wait(tasks, timeout=35)
    return stats.summary(elapsed)


async def _read_with_head(reader: asyncio.StreamReader) -> tuple[int, bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = _CONTENT_LENGTH.search(head)
    if length is None and not head.startswith((b"HTTP/1.1 304", b"HTTP/1.1 204")):
        raise RuntimeError(f"an answer without Content-Length: {head[:200]!r}")
    body = await reader.readexactly(int(length[1])) if length else b""
    return int(head[9:12]), head, body


@dataclass
class _Poller:
    """One interval-polling client: its connection, position and sequence check."""

    path: str
    flavor: str
    cursor: str = "$"
    validators: str = ""
    last_seq: int = -1

    def request(self, host: str) -> bytes:
        if self.flavor == "hub":
            return f"GET {self.path}&after={self.cursor} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        return f"GET {self.path} HTTP/1.1\r\nHost: {host}\r\n{self.validators}\r\n".encode()

    def answered(self, head: bytes, body: bytes) -> None:
        if self.flavor == "hub":
            if (match := _NEXT.search(body)) is not None:
                self.cursor = match[1].decode()
            return
        etag, modified = _ETAG.search(head), _LAST_MODIFIED.search(head)
        if etag is not None and modified is not None:
            self.validators = f"If-None-Match: {etag[1].decode()}\r\nIf-Modified-Since: {modified[1].decode()}\r\n"


async def _interval_poll(
    poller: _Poller,
    connection: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    first_at: float,
    interval: float,
    window: tuple[float, float],
    stats: Stats,
    ages_us: list[int],
) -> None:
    """Poll at ``first_at`` and every ``interval`` after it (at once when an answer came late),
    while the next poll is due before the window's end (loop time)."""
    reader, writer = connection
    loop = asyncio.get_running_loop()
    at = first_at
    while at < window[1]:
        await asyncio.sleep(max(0.0, at - loop.time()))
        sent, sent_pc = loop.time(), time.perf_counter()  # uvloop's clock counts milliseconds
        writer.write(poller.request("127.0.0.1"))
        status, head, body = await _read_with_head(reader)
        latency_us = int((time.perf_counter() - sent_pc) * 1e6)
        received_ns = time.time_ns()
        counted = window[0] <= sent < window[1]
        if status not in (200, 304):
            stats.errors += 1
        else:
            poller.answered(head, body)
        if counted:
            stats.requests += 1
            stats.latencies_us.append(latency_us)
        for match in _EVENT.finditer(body):
            seq = int(match[1])
            if seq <= poller.last_seq:
                stats.duplicates += 1
                continue
            if poller.last_seq >= 0 and seq != poller.last_seq + 1:
                stats.gaps += 1
            poller.last_seq = seq
            if counted:
                stats.deliveries += 1
                ages_us.append((received_ns - int(match[2])) // 1000)
        at = max(at + interval, loop.time())
    writer.close()


async def interval(
    host: str, port: int, paths: list[str], seconds: float, every: float, flavor: str
) -> dict[str, object]:
    stats = Stats()
    ages_us: list[int] = []
    connections = []
    for start in range(0, len(paths), 200):
        wave = paths[start : start + 200]
        connections += await asyncio.gather(*(asyncio.open_connection(host, port) for _ in wave))
    print("READY", flush=True)
    loop = asyncio.get_running_loop()
    start_at = float(await loop.run_in_executor(None, sys.stdin.readline))
    now = loop.time()
    window = (now + start_at - time.time(), now + start_at - time.time() + seconds)
    tasks = [
        asyncio.create_task(
            _interval_poll(
                _Poller(path, flavor), connection, now + every * i / len(paths), every, window, stats, ages_us
            )
        )
        for i, (path, connection) in enumerate(zip(paths, connections, strict=True))
    ]
    done, pending = await asyncio.wait(tasks, timeout=window[1] - loop.time() + 30)
    for task in pending:
        task.cancel()
    failed = [task.exception() for task in done if task.exception() is not None]
    summary = stats.summary(seconds)
    ages = sorted(ages_us)
    summary |= {
        "clients": len(paths),
        "failed_clients": len(failed) + len(pending),
        "first_failure": repr(failed[0])[:300] if failed else None,
        "event_age_ms": {
            "p50": round(ages[len(ages) // 2] / 1000, 2) if ages else None,
            "p99": round(ages[min(len(ages) - 1, int(0.99 * len(ages)))] / 1000, 2) if ages else None,
        },
    }
    return summary


async def create(host: str, port: int, rate: float, seconds: float, headers: str, body: bytes) -> dict[str, object]:
    stats = Stats()
    connections = [await asyncio.open_connection(host, port) for _ in range(16)]
    free: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    for connection in connections:
        free.put_nowait(connection)
    request = (
        f"POST /v1/jobs HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{headers}\r\n"
    ).encode() + body

    async def one() -> None:
        reader, writer = await free.get()
        started = time.perf_counter_ns()
        writer.write(request)
        status, _ = await _read_response(reader)
        stats.latencies_us.append((time.perf_counter_ns() - started) // 1000)
        stats.requests += 1
        if status != 201:
            stats.errors += 1
        free.put_nowait((reader, writer))

    print("READY", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    loop = asyncio.get_running_loop()
    start = loop.time()
    pending = set()
    sent = 0
    while (now := loop.time()) - start < seconds:
        due = int((now - start) * rate) - sent
        for _ in range(due):
            pending.add(asyncio.create_task(one()))
            sent += 1
        await asyncio.sleep(0.002)
    await asyncio.gather(*pending)
    return stats.summary(loop.time() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["sse", "idle", "poll", "interval", "create"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--paths", help="file with one path per line")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--header", default="", help="extra header line, e.g. 'Authorization: Bearer k'")
    parser.add_argument("--body", default='{"type": "external"}')
    parser.add_argument("--interval", type=float, default=1.0, help="interval: seconds between a client's polls")
    parser.add_argument("--flavor", choices=["hub", "nchan"], default="hub", help="interval: how a client resumes")
    parser.add_argument("--many", action="store_true", help="sse: each path is a many-jobs stream (/v1/events?jobs=)")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    paths = open(args.paths).read().split() if args.paths else []
    headers = f"{args.header}\r\n" if args.header else ""
    host = "127.0.0.1"
    if args.mode == "sse":
        result = uvloop.run(sse(host, args.port, paths, args.seconds, headers, args.many))
    elif args.mode == "idle":
        result = uvloop.run(idle(host, args.port, paths, headers))
    elif args.mode == "poll":
        result = uvloop.run(poll(host, args.port, paths, args.seconds, headers))
    elif args.mode == "interval":
        result = uvloop.run(interval(host, args.port, paths, args.seconds, args.interval, args.flavor))
    else:
        result = uvloop.run(create(host, args.port, args.rate, args.seconds, headers, args.body.encode()))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
