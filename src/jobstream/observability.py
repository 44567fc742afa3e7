"""Logging set-up; import-safe (nothing happens until a function is called)."""

from __future__ import annotations

import logging
import re
from typing import Any

_TOKEN_IN_QUERY = re.compile(r"(?i)([?&](?:token|access_token)=)[^&\s]*")


def redact(text: str) -> str:
    return _TOKEN_IN_QUERY.sub(r"\1REDACTED", text)


class RedactTokens(logging.Filter):
    """Keep read tokens (passed as ?token= by EventSource) out of access log lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact(arg) if isinstance(arg, str) else arg for arg in record.args)
        return True


def log_config(level: str) -> dict[str, Any]:
    """A logging dictConfig shared by `serve`, `worker` and `dev`, also handed to uvicorn."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"redact": {"()": RedactTokens}},
        "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "plain", "filters": ["redact"]},
        },
        "loggers": {
            "jobstream": {"level": level.upper()},
            "uvicorn": {"level": level.upper()},
            "uvicorn.access": {"level": level.upper(), "filters": ["redact"]},
        },
        "root": {"handlers": ["stderr"], "level": "WARNING"},
    }
