"""Python client of a jobstream gateway: `Client` (blocking) and `AsyncClient` (asyncio), with
the same methods. Both drive one implementation of the protocol (`protocol`, `follow`).

    from jobstream.client import Client

    with Client("http://localhost:8000", api_key="...") as client:
        job = client.create("demo.story", {"words": 20})
        for event in client.follow(job):
            if event.type == "delta":
                print(event.data["text"], end="", flush=True)
        print(client.get(job.id).status)
"""

from jobstream.client.aio import AsyncClient
from jobstream.client.errors import ClientError, FollowError, ProblemError
from jobstream.client.follow import RetryPolicy, Transport
from jobstream.client.models import CreatedJob, Event, JobPage, JobStatus, Progress, ReadToken
from jobstream.client.sync import Client

__all__ = [
    "AsyncClient",
    "Client",
    "ClientError",
    "CreatedJob",
    "Event",
    "FollowError",
    "JobPage",
    "JobStatus",
    "Progress",
    "ProblemError",
    "ReadToken",
    "RetryPolicy",
    "Transport",
]
