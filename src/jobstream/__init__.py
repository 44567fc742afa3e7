"""jobstream: a server-sent-events gateway over Redis for long-running jobs."""

from jobstream.producer import JobContext, JobFailed
from jobstream.registry import handler

__version__ = "0.1.0"
__all__ = ["JobContext", "JobFailed", "__version__", "handler"]
