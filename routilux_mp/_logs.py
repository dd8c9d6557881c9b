"""Logging from logic reaches the supervisor's logging, with the worker, pid, routine and job attached.

Worker side: :func:`forward_from_worker` installs a :class:`ForwardHandler` on
the worker's root logger. It sends each record that passes the worker's
levels as plain data (``_Log``: logger name, level, message, exception text,
where it was logged, and which activation logged it); ``warnings.warn`` goes
through logging too. The levels are the supervisor's at the worker's start
(:func:`parent_levels`), so what the supervisor would drop is not even sent.

Supervisor side: :func:`replay` turns the data back into a ``LogRecord``
with ``worker`` (the worker lane), ``pid``, ``worker_id``, ``routine`` and
``job_id`` attributes and hands it to the logger of the same name, if that
logger is enabled for its level now: handlers, filters and propagation are
the supervisor's own configuration.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

from . import _context

__all__ = ["ForwardHandler", "_Log", "forward_from_worker", "parent_levels", "replay"]


class _Log(NamedTuple):
    """A logging record of a worker, as data (worker -> supervisor, on the result pipe)."""

    record: dict

    def __repr__(self) -> str:
        return f"_Log({self.record.get('name')!r} {self.record.get('levelname')})"


def parent_levels() -> tuple[tuple[str, int], ...]:
    """The levels set in this process: the root's effective level, and every logger's own level."""
    levels = [("", logging.getLogger().getEffectiveLevel())]
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET:
            levels.append((name, logger.level))
    return tuple(levels)


class ForwardHandler(logging.Handler):
    """Sends every record to the supervisor as a ``_Log`` (in the worker process that installed it only)."""

    def __init__(self, send: Callable[[Any], None]) -> None:
        super().__init__()
        self.send = send
        self.pid = os.getpid()
        self._formatter = logging.Formatter()

    def emit(self, record: logging.LogRecord) -> None:
        if os.getpid() != self.pid:  # a child that logic forked: it has no pipe of ours to speak on
            return
        try:
            exc_text = record.exc_text
            if record.exc_info and not exc_text:
                exc_text = self._formatter.formatException(record.exc_info)
            ctx = _context.running()
            job = getattr(ctx, "job", None)
            data = {
                "name": record.name, "levelno": record.levelno, "levelname": record.levelname,
                "msg": record.getMessage(), "args": None, "exc_text": exc_text, "stack_info": record.stack_info,
                "pathname": record.pathname, "filename": record.filename, "module": record.module,
                "lineno": record.lineno, "funcName": record.funcName, "created": record.created,
                "msecs": record.msecs, "process": record.process, "processName": record.processName,
                "thread": record.thread, "threadName": record.threadName,
                "routine": getattr(ctx, "routine_id", None), "job_id": None if job is None else job.job_id,
                "worker_id": None if job is None else job.worker_id,
            }
            self.send(_Log(data))
        except Exception:  # noqa: BLE001 - logging's own convention
            self.handleError(record)


def forward_from_worker(send: Callable[[Any], None], levels: tuple[tuple[str, int], ...]) -> None:
    """In a worker process: send every log record (and warning) to the supervisor, at its levels."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(ForwardHandler(send))
    for name, level in levels:
        logging.getLogger(name or None).setLevel(level)
    logging.captureWarnings(True)


def locked(send: Callable[[Any], None]) -> Callable[[Any], None]:
    """``send`` made safe for the threads logic starts (their records share the pipe with results)."""
    lock = threading.Lock()

    def send_locked(message: Any) -> None:
        with lock:
            send(message)

    return send_locked


def replay(record: dict, worker: int, pid: int | None) -> None:
    """Hand a worker's record to the logger of its name here, if that logger takes its level now."""
    logger = logging.getLogger(record.get("name") or None)
    if not logger.isEnabledFor(record.get("levelno", logging.INFO)):
        return
    rec = logging.makeLogRecord(record)
    rec.worker = worker
    rec.pid = pid if pid is not None else record.get("process")
    logger.handle(rec)
