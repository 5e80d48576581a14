"""Progress lines for long stages: done / total, rate and ETA, printed at most every few seconds.

::

    progress = Progress("item_summaries", total=1000, unit="items")
    for row in ds.iter_rows():
        progress.update(row["rows_in"])
    progress.close()

prints, at most every ``every_s`` seconds (``MLLM_MSR_PROGRESS_S``, default 5)::

    [item_summaries] 420/1000 items (42%)  3.10 items/s  ETA 3m07s

Not on a terminal (a log file, ``ray job logs``, CI) each update is one line; on a terminal the
line is redrawn in place (``\\r``) at most twice a second and ended when the stage closes it.
The last update (``done == total``) and :meth:`Progress.close` always print, so every stage that
uses one prints at least one progress line.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import TextIO

DEFAULT_EVERY_S = 5.0
TTY_EVERY_S = 0.5
ENV_EVERY_S = "MLLM_MSR_PROGRESS_S"


def format_duration(seconds: float | None) -> str:
    """``7 s``, ``3m07s``, ``2h05m``; ``?`` when unknown."""
    if seconds is None or seconds != seconds or seconds < 0 or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def format_rate(per_s: float | None, unit: str) -> str:
    """``3.10 items/s``; a slow rate as ``12.5 s/item``; ``? items/s`` when unknown."""
    if not per_s or per_s <= 0:
        return f"? {unit}/s"
    if per_s < 0.1:
        singular = unit[:-1] if unit.endswith("s") else unit
        return f"{1 / per_s:.1f} s/{singular}"
    digits = 2 if per_s < 10 else 1 if per_s < 100 else 0
    return f"{per_s:.{digits}f} {unit}/s"


def default_every_s() -> float:
    try:
        return float(os.environ.get(ENV_EVERY_S, DEFAULT_EVERY_S))
    except ValueError:
        return DEFAULT_EVERY_S


class Progress:
    """Counts work done in one stage and prints a throttled progress line (see module doc).

    ``total`` may be ``None`` (unknown: no percentage or ETA). ``extra`` fields given to
    :meth:`update` (e.g. ``loss=0.69``) are appended to the line as ``key value``.
    """

    def __init__(
        self,
        label: str,
        total: int | None,
        unit: str = "items",
        every_s: float | None = None,
        stream: TextIO | None = None,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        write: Callable[[str], None] | None = None,
        initial: int = 0,
    ) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.stream = stream if stream is not None else sys.stdout
        if tty is None:
            isatty = getattr(self.stream, "isatty", None)
            tty = bool(isatty and isatty())
        self.tty = tty and write is None
        self.every_s = default_every_s() if every_s is None else every_s
        if self.tty:
            self.every_s = min(self.every_s, TTY_EVERY_S)
        self.clock = clock
        self._write = write
        self.start = clock()
        self.initial = initial
        self.done = initial
        self.extra: dict[str, object] = {}
        self.printed = 0
        self._last_print: float | None = None
        self._last_done = -1
        self._live = False  # a \r line is on the terminal
        self.closed = False

    # counting ------------------------------------------------------------------
    def update(self, n: int = 1, **extra: object) -> bool:
        """Add ``n`` done; returns whether a line was printed."""
        return self.set(self.done + n, **extra)

    def set(self, done: int, **extra: object) -> bool:
        """Set the count done; returns whether a line was printed."""
        self.done = done
        self.extra.update(extra)
        now = self.clock()
        finished = self.total is not None and self.done >= self.total
        due = self._last_print is None or now - self._last_print >= self.every_s
        if finished or due:
            self._emit(now)
            return True
        return False

    def close(self) -> None:
        """Print the final line (unless it is already the last one printed) and end it."""
        if self.closed:
            return
        self.closed = True
        if self._last_print is None or self.done != self._last_done:
            self._emit(self.clock())
        if self._live:
            self.stream.write("\n")
            self.stream.flush()
            self._live = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # formatting ------------------------------------------------------------------
    @property
    def elapsed(self) -> float:
        return self.clock() - self.start

    def rate(self, now: float | None = None) -> float | None:
        seconds = (self.clock() if now is None else now) - self.start
        done = self.done - self.initial
        return done / seconds if seconds > 0 and done > 0 else None

    def eta(self, now: float | None = None) -> float | None:
        rate = self.rate(now)
        if self.total is None or not rate:
            return None
        return max(0.0, (self.total - self.done) / rate)

    def line(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        if self.total is not None:
            pct = 100.0 * self.done / self.total if self.total else 100.0
            count = f"{self.done}/{self.total} {self.unit} ({pct:.0f}%)"
        else:
            count = f"{self.done} {self.unit}"
        parts = [f"[{self.label}] {count}", format_rate(self.rate(now), self.unit)]
        for key, value in self.extra.items():
            if isinstance(value, float):
                value = f"{value:.4g}"
            parts.append(f"{key} {value}")
        if self.total is not None and self.done < self.total:
            parts.append(f"ETA {format_duration(self.eta(now))}")
        else:
            parts.append(f"in {format_duration(now - self.start)}")
        return "  ".join(parts)

    def _emit(self, now: float) -> None:
        line = self.line(now)
        self._last_print, self._last_done = now, self.done
        self.printed += 1
        if self._write is not None:
            self._write(line)
        elif self.tty:
            self.stream.write("\r" + line + "\x1b[K")
            self.stream.flush()
            self._live = True
        else:
            self.stream.write(line + "\n")
            self.stream.flush()
