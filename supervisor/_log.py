"""structlog set-up: JSON lines on stdout, with per-task context.

Each instance task binds ``instance=<name>`` with
:func:`structlog.contextvars.bound_contextvars`; because contextvars are
copied into child tasks (and qmp_glue carries them across to its asyncio
thread), every line logged on behalf of an instance says which one.
"""

from __future__ import annotations

import logging
import sys

import structlog


def configure(level: str = "info", stream=None) -> None:
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stdout),
        cache_logger_on_first_use=True,
    )


def get(name: str = "qsup"):
    return structlog.get_logger(name)
