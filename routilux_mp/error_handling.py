"""What happens to a job when an activation fails: :class:`ErrorHandler`."""

from __future__ import annotations

import enum
from collections.abc import Iterable

from ._messages import type_name

__all__ = ["ErrorHandler", "ErrorStrategy"]


class ErrorStrategy(str, enum.Enum):
    """How a failed activation affects its job.

    * ``STOP`` (default): the job ends ``failed`` with the error.
    * ``CONTINUE``: the error is recorded on the job (``job.error``), emits made
      before the failure are delivered, and the job goes on.
    * ``RETRY``: the logic is re-run (same input) up to ``max_retries`` times,
      waiting ``retry_delay * retry_backoff ** (attempt - 1)`` seconds between
      tries; then the job ends ``failed``.
    * ``SKIP``: the input is dropped silently (a trace entry records it) and the
      job goes on.
    """

    STOP = "stop"
    CONTINUE = "continue"
    RETRY = "retry"
    SKIP = "skip"


class ErrorHandler:
    """Decides what a failed activation does to its job.

    Set it on a routine (``routine.set_error_handler(...)``) or on a flow as the
    default for its routines. Crashes and timeouts count as failures too, but a
    crashing activation is never retried more than the runtime's
    ``max_crash_retries``.

    Args:
        strategy: an :class:`ErrorStrategy` or its string value; anything else
            is a ``TypeError``.
        max_retries: re-runs allowed with ``RETRY`` (not counting the first run).
        retry_delay: seconds before the first re-run.
        retry_backoff: multiplier applied to the delay for each further re-run.
        retryable_exceptions: exception classes (or their names, e.g.
            ``"ValueError"`` or ``"mypkg.errors.Flaky"``) that may be retried;
            kept as given in :attr:`retryable_exceptions`. The default,
            ``(Exception,)``, retries every failure but ``SystemExit`` and
            ``KeyboardInterrupt`` raised by logic. A failure that is not
            retryable is handled as ``STOP``. Matching is by the class names
            of the error's hierarchy (errors cross processes as data).
        is_critical: routilux 1.1.0's flag for "the job must fail when the
            retries run out"; kept as given. In routilux-mp that is what
            happens with or without it (it was so in routilux 1.1.0 as well).
    """

    def __init__(
        self,
        strategy: ErrorStrategy | str = ErrorStrategy.STOP,
        max_retries: int = 3,
        retry_delay: float = 1.0,
        retry_backoff: float = 2.0,
        retryable_exceptions: Iterable[type[BaseException] | str] | None = None,
        is_critical: bool = False,
    ) -> None:
        if not isinstance(strategy, str):  # ErrorStrategy members are str too
            raise TypeError(f"strategy must be an ErrorStrategy or its string value, got {type(strategy).__name__}")
        try:
            self.strategy = ErrorStrategy(strategy)
        except ValueError:
            choices = ", ".join(repr(s.value) for s in ErrorStrategy)
            raise ValueError(f"unknown error strategy {strategy!r}; choose one of {choices}") from None
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if retry_delay < 0 or retry_backoff < 1:
            raise ValueError("retry_delay must be >= 0 and retry_backoff >= 1")
        self.max_retries = int(max_retries)
        self.retry_delay = float(retry_delay)
        self.retry_backoff = float(retry_backoff)
        self.is_critical = bool(is_critical)
        retryable = (Exception,) if retryable_exceptions is None else tuple(retryable_exceptions)
        for exc in retryable:
            if not isinstance(exc, str) and not (isinstance(exc, type) and issubclass(exc, BaseException)):
                raise TypeError(f"retryable_exceptions holds exception classes or their names, got {exc!r}")
        #: The exception classes (or names) that may be retried, as given.
        self.retryable_exceptions: tuple[type[BaseException] | str, ...] = retryable
        self._retryable_names = frozenset(exc if isinstance(exc, str) else type_name(exc) for exc in retryable)

    def is_retryable(self, error_mro: Iterable[str]) -> bool:
        """True when an error whose class hierarchy has these names may be retried."""
        mro = list(error_mro)
        names = set(mro) | {name.rsplit(".", 1)[-1] for name in mro}
        return not self._retryable_names.isdisjoint(names)

    def delay_before(self, attempt: int) -> float:
        """Seconds to wait before running attempt number ``attempt`` (2 = first retry)."""
        return self.retry_delay * self.retry_backoff ** max(0, attempt - 2)

    def __repr__(self) -> str:
        return (
            f"ErrorHandler(strategy={self.strategy.value!r}, max_retries={self.max_retries}, "
            f"retry_delay={self.retry_delay}, retry_backoff={self.retry_backoff}, "
            f"is_critical={self.is_critical})"
        )
