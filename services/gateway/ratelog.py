"""Rate-limited logging: at most one line per cause per period, with the count of lines it held back.

A stream of garbage requests (or one bug hit by every request) must not write thousands of log lines: the
first occurrence of a cause is logged, repeats within `period_s` are only counted, and the next line for that
cause says how many were suppressed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable


class RateLimitedLog:
    """`log.log(cause, level, msg, *args, exc_info=...)` logs at most once per `period_s` per cause."""

    def __init__(self, logger: logging.Logger, period_s: float = 10.0, max_causes: int = 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if period_s <= 0 or max_causes < 1:
            raise ValueError(f"period_s must be > 0 and max_causes >= 1, got {period_s}, {max_causes}")
        self.logger, self.period_s, self.max_causes, self._clock = logger, period_s, max_causes, clock
        self._last: dict[str, float] = {}  # cause -> when its last line was written
        self._held: dict[str, int] = {}  # cause -> lines suppressed since
        self._lock = threading.Lock()

    def log(self, cause: str, level: int, msg: str, *args, exc_info=None) -> bool:
        """Logs `msg % args` unless `cause` was logged less than `period_s` ago; True when a line was written."""
        now = self._clock()
        with self._lock:
            last = self._last.get(cause)
            if last is not None and now - last < self.period_s:
                self._held[cause] = self._held.get(cause, 0) + 1
                return False
            if last is None and len(self._last) >= self.max_causes:  # bounded memory: forget the oldest cause
                oldest = min(self._last, key=self._last.__getitem__)
                self._last.pop(oldest)
                self._held.pop(oldest, None)
            held = self._held.pop(cause, 0)
            self._last[cause] = now
        if held:
            msg, args = msg + " (%d more like this suppressed in the last %.0f s)", (*args, held, self.period_s)
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True
