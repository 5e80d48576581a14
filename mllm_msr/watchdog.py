"""No-progress limits for stages: fail with a message naming the stage instead of hanging.

:func:`no_progress_watchdog` watches a progress value (rows written, files present, a counter
the stage bumps, ...) from a daemon thread. When the value has not changed for ``limit_s`` it
logs the reason and interrupts the thread that entered the ``with`` block, which then raises
:class:`StageStalled` naming the stage, the limit and the setting that raises it.

The main thread is interrupted with a real ``SIGINT`` (``signal.pthread_kill``), which also wakes
it from blocking waits (``time.sleep``, lock acquires, ``ray.get``'s signal checks); it is turned
into :class:`StageStalled` when the ``with`` block exits. That needs Python's own SIGINT handler
(the default); under another Python handler the interrupt goes to that handler, and without one
(``SIG_DFL``/``SIG_IGN``) the asynchronous exception below is used. Other threads get an
asynchronous :class:`StageStalled` (``PyThreadState_SetAsyncExc``), delivered at the thread's next
Python bytecode: a thread blocked inside a C call without timeout sees it only when the call
returns.

Ray Data has its own guard in the streaming executor (Ray 2.60:
``DataContext.execution_no_progress_timeout_s``, default 30 min, env
``RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S``; ``-1`` disables; it is skipped for datasets with
all-to-all operators and counts only scheduling-loop progress). :func:`ray_data_no_progress` sets
it for datasets created inside the block and re-raises its ``ExecutionTimeoutError`` as
:class:`StageStalled`.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)

RAY_DATA_SETTING = "execution_no_progress_timeout_s"
"""``ray.data.DataContext`` field of Ray Data's own no-progress guard (absent in old Rays)."""


class StageStalled(RuntimeError):
    """A stage made no progress for its limit."""

    def __init__(
        self,
        stage: str = "?",
        limit_s: float = 0.0,
        idle_s: float | None = None,
        last: Any = None,
        setting: str | None = None,
        detail: str | None = None,
    ) -> None:
        self.stage, self.limit_s, self.idle_s, self.last = stage, limit_s, idle_s, last
        self.setting = setting
        idle = f"{idle_s:.1f} s" if idle_s is not None else f"at least {limit_s:g} s"
        how = setting or "the stage's no-progress limit"
        value = f"; last progress value {last!r}" if last is not None else ""
        msg = (
            f"stage {stage!r} made no progress for {idle} (limit {limit_s:g} s{value}). "
            f"If it is legitimately this slow, raise {how} (0 or a negative value disables it)."
        )
        if detail:
            msg += "\n" + detail
        super().__init__(msg)


def _async_raise(thread_id: int, exc: type[BaseException] | None) -> int:
    """Raise ``exc`` in thread ``thread_id`` at its next bytecode (None cancels); threads hit."""
    return ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc is not None else None
    )


class Watchdog:
    """State of one :func:`no_progress_watchdog` block; :meth:`beat` reports progress by hand."""

    def __init__(
        self,
        stage: str,
        limit_s: float,
        progress: Callable[[], Any] | None,
        setting: str | None,
        poll_s: float | None,
    ) -> None:
        self.stage, self.limit_s, self.progress, self.setting = stage, limit_s, progress, setting
        self.poll_s = poll_s if poll_s is not None else min(max(limit_s / 10, 0.01), 5.0)
        self.stalled: StageStalled | None = None
        self._beats = 0
        self._lock = threading.Lock()
        self._closed = False
        self._stop = threading.Event()
        self._target = threading.current_thread()
        self._how: str | None = None  # "signal" or "async" once fired
        self._previous: Any = None  # the SIGINT handler before the block (main thread only)
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        """Count as progress (for stages that report progress themselves)."""
        self._beats += 1

    def _value(self, last: tuple[int, Any]) -> tuple[int, Any]:
        if self.progress is None:
            return self._beats, None
        try:
            return self._beats, self.progress()
        except Exception as e:  # a failing probe is no progress, not a crash of the watchdog
            log.debug("stage %s: progress probe failed: %r", self.stage, e)
            return self._beats, last[1]

    def _watch(self) -> None:
        last = self._value((0, None))
        since = time.monotonic()
        while not self._stop.wait(self.poll_s):
            value = self._value(last)
            now = time.monotonic()
            if value != last:
                last, since = value, now
            elif now - since >= self.limit_s:
                shown = value[1] if self.progress is not None else value[0]
                self._fire(StageStalled(self.stage, self.limit_s, now - since, shown, self.setting))
                return

    def _fire(self, stalled: StageStalled) -> None:
        with self._lock:
            if self._closed:
                return
            self.stalled = stalled
            log.error("%s", stalled)
            target = self._target
            if self._previous is not None:  # our SIGINT handler is installed for the block
                self._how = "signal"
                signal.pthread_kill(target.ident, signal.SIGINT)
            else:
                self._how = "async"
                _async_raise(target.ident, StageStalled)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        """Our SIGINT handler for the block: the watchdog's interrupt raises here whatever
        handler an engine installed before (vLLM's exits the process with status 0); a real
        Ctrl-C goes to the previous handler."""
        if self.stalled is not None:
            raise KeyboardInterrupt
        previous = self._previous
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            signal.default_int_handler(signum, frame)

    def __enter__(self) -> Watchdog:
        self._previous = None
        if self.limit_s > 0 and self._target is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._on_sigint)
        if self.limit_s > 0:
            self._thread = threading.Thread(
                target=self._watch, name=f"watchdog-{self.stage}", daemon=True
            )
            self._thread.start()
        return self

    def _close(self) -> None:
        with self._lock:
            self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _drain(self) -> None:
        """Take an interrupt the block did not see (it ended as the watchdog fired) here."""
        if self._how == "async":
            _async_raise(self._target.ident, None)  # cancel it if not delivered yet
            return
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            ctypes.pythonapi.PyErr_CheckSignals()  # runs the SIGINT handler if pending
            time.sleep(0.01)

    def __exit__(self, exc_type, exc, tb) -> bool:
        ours = (KeyboardInterrupt, StageStalled)
        seen = exc_type is not None and issubclass(exc_type, ours)
        try:
            self._close()
            if self.stalled is not None and not seen:
                self._drain()
        except ours:
            self._stop.set()
            if self.stalled is None:
                self._restore()
                raise  # a real Ctrl-C
        self._restore()
        if self.stalled is None:
            return False
        if exc_type is None or seen:
            raise self.stalled from None
        return False  # the block failed with something else: let that through


def no_progress_watchdog(
    stage: str,
    limit_s: float | None,
    progress: Callable[[], Any] | None = None,
    *,
    setting: str | None = None,
    poll_s: float | None = None,
) -> Watchdog:
    """Fail the ``with`` block with :class:`StageStalled` when ``progress()`` (any comparable
    value, called from a watcher thread every ``poll_s``) and :meth:`Watchdog.beat` calls have
    not changed for ``limit_s`` seconds. ``limit_s`` None or <= 0 disables it. ``setting`` names
    the config key or variable that raises the limit, for the message.

        with no_progress_watchdog("item_summaries", 1800, lambda: run.usage(["x"]),
                                  setting="stages.item_summaries.no_progress_s"):
            ...
    """
    return Watchdog(stage, float(limit_s or 0), progress, setting, poll_s)


def configure_ray_data_no_progress(limit_s: float | None, context: Any = None) -> bool:
    """Set Ray Data's own no-progress timeout (``-1`` when ``limit_s`` is None or <= 0) on
    ``context`` (default: the current ``DataContext``; datasets copy it when they are created).
    False when this Ray has no such setting."""
    if context is None:
        from ray.data import DataContext

        context = DataContext.get_current()
    if not hasattr(context, RAY_DATA_SETTING):
        return False
    setattr(context, RAY_DATA_SETTING, float(limit_s) if limit_s and limit_s > 0 else -1)
    return True


def _ray_data_timeout(exc: BaseException) -> BaseException | None:
    try:
        from ray.data.exceptions import ExecutionTimeoutError
    except ImportError:
        return None
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ExecutionTimeoutError):
            return seen
        seen = seen.__cause__
    return None


@contextlib.contextmanager
def ray_data_no_progress(
    stage: str, limit_s: float | None, *, setting: str | None = None
) -> Iterator[bool]:
    """Within the block, datasets created get Ray Data's no-progress timeout ``limit_s`` (None
    or <= 0 disables it), and its ``ExecutionTimeoutError`` becomes :class:`StageStalled` naming
    ``stage``. Yields whether this Ray has the setting. The previous value is restored after."""
    from ray.data import DataContext

    context = DataContext.get_current()
    before = getattr(context, RAY_DATA_SETTING, None)
    available = configure_ray_data_no_progress(limit_s, context)
    try:
        yield available
    except Exception as e:
        cause = _ray_data_timeout(e)
        if cause is None:
            raise
        raise StageStalled(
            stage, float(limit_s or 0), None, None, setting, detail=str(cause)
        ) from e
    finally:
        if available:
            setattr(context, RAY_DATA_SETTING, before)
