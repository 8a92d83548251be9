"""Progress of a long recovery run: counts, a periodic INFO line, a terminal line.

The worker reports to a :class:`ProgressHook` (``planned``, ``phase``,
``counted``), from any thread. :class:`Progress` keeps the counts and, while it
is entered, logs ``recovery progress: done/total ...`` every ``interval``
seconds (nothing for a run shorter than that) and, given a :class:`TerminalLine`,
redraws one line on a terminal. Standard library only.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import Protocol, TextIO

from coordinator.prepared import Finish

__all__ = ["NO_PROGRESS", "Counts", "Outcome", "Progress", "ProgressHook", "TerminalLine",
           "outcome_of"]

log = logging.getLogger("recovery")


class Outcome(StrEnum):
    """What became of one in-doubt transaction in this run."""

    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"
    SKIPPED = "skipped"
    """Resolved by someone else meanwhile."""
    REMAINING = "remaining"
    """Left in doubt (no proof either way, busy, or finishing it failed)."""


def outcome_of(commit: bool, finished: str) -> Outcome:
    """The outcome of ``COMMIT``/``ROLLBACK PREPARED``: a :class:`Finish` value, or an
    error text (left in doubt)."""
    if finished == Finish.DONE:
        return Outcome.COMMITTED if commit else Outcome.ROLLED_BACK
    if finished == Finish.GONE:
        return Outcome.SKIPPED
    return Outcome.REMAINING


class ProgressHook(Protocol):
    """What the recovery worker reports while it runs (called from any thread)."""

    def planned(self, total: int) -> None:
        """``total`` in-doubt transactions past the grace period are to be resolved."""

    def phase(self, text: str) -> None:
        """What the run is doing now (reading a decision log, finishing...)."""

    def counted(self, outcome: Outcome) -> None:
        """One of them is done with ``outcome``."""


class _NoProgress:
    def planned(self, total: int) -> None:
        pass

    def phase(self, text: str) -> None:
        pass

    def counted(self, outcome: Outcome) -> None:
        pass


NO_PROGRESS: ProgressHook = _NoProgress()


@dataclass(frozen=True, slots=True)
class Counts:
    total: int = 0
    committed: int = 0
    rolled_back: int = 0
    skipped: int = 0
    remaining: int = 0
    phase: str = "starting"
    seconds: float = 0.0

    @property
    def done(self) -> int:
        return self.committed + self.rolled_back + self.skipped + self.remaining

    def line(self, dry_run: bool = False) -> str:
        pct = f" ({100 * self.done // self.total}%)" if self.total else ""
        commit, roll_back = (("would commit", "would roll back") if dry_run
                             else ("committed", "rolled back"))
        return (f"{self.done}/{self.total} done{pct}: {commit} {self.committed}, "
                f"{roll_back} {self.rolled_back}, skipped {self.skipped}, "
                f"left in doubt {self.remaining}; {self.phase}; {self.seconds:.1f} s")


class TerminalLine:
    """One line redrawn in place on a terminal (``\\r`` and erase-to-end-of-line).

    Log records must go through :meth:`handler` so that they never land in the
    middle of the line: the line is erased before a record is written and
    redrawn at the next tick.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.lock = threading.RLock()
        self._shown = False

    def show(self, text: str) -> None:
        width = max(20, shutil.get_terminal_size((100, 24)).columns - 1)
        with self.lock:
            self.stream.write("\r" + text[:width] + "\x1b[K")
            self.stream.flush()
            self._shown = True

    def clear(self) -> None:
        with self.lock:
            if self._shown:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
                self._shown = False

    def handler(self) -> logging.Handler:
        """A stream handler on the same stream that erases the line first."""
        return _LineAwareHandler(self)


class _LineAwareHandler(logging.StreamHandler):  # type: ignore[type-arg]
    def __init__(self, line: TerminalLine) -> None:
        super().__init__(line.stream)
        self._line = line

    def emit(self, record: logging.LogRecord) -> None:
        with self._line.lock:
            self._line.clear()
            super().emit(record)


class Progress:
    """Counts of one recovery run, reported while entered (see the module docstring).

    ``interval``: seconds between INFO lines (0: at every change; checked at each
    change and at each tick of a background thread); ``display``: a terminal
    line, redrawn every ``redraw`` seconds and after each INFO line, or ``None``;
    ``clock``: monotonic seconds (injectable for tests).
    """

    def __init__(self, interval: float = 5.0, *, display: TerminalLine | None = None,
                 redraw: float = 0.2, dry_run: bool = False,
                 logger: logging.Logger = log,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if interval < 0:
            raise ValueError("the progress interval must be >= 0")
        self.interval = interval
        self.display = display
        self.redraw = redraw
        self.dry_run = dry_run
        self._log = logger
        self._clock = clock
        self._lock = threading.Lock()
        self._counts = Counts()
        self._started = clock()
        self._last_log = self._started
        self._logged = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- ProgressHook ------------------------------------------------------------

    def planned(self, total: int) -> None:
        self._update(total=total)

    def phase(self, text: str) -> None:
        self._update(phase=text)

    def counted(self, outcome: Outcome) -> None:
        with self._lock:
            c = self._counts
            self._counts = Counts(
                c.total, c.committed + (outcome is Outcome.COMMITTED),
                c.rolled_back + (outcome is Outcome.ROLLED_BACK),
                c.skipped + (outcome is Outcome.SKIPPED),
                c.remaining + (outcome is Outcome.REMAINING), c.phase)
        self._maybe_log()

    # -- reading -----------------------------------------------------------------

    @property
    def logged(self) -> int:
        """INFO lines logged so far."""
        return self._logged

    def snapshot(self) -> Counts:
        with self._lock:
            c = self._counts
        return Counts(c.total, c.committed, c.rolled_back, c.skipped, c.remaining, c.phase,
                      self._clock() - self._started)

    # -- running -----------------------------------------------------------------

    def __enter__(self) -> Progress:
        self._started = self._last_log = self._clock()
        self._thread = threading.Thread(target=self._tick, name="recovery-progress",
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.display is not None:
            self.display.clear()
        c = self.snapshot()
        if self._logged and c.total:  # a long run: say where it ended
            self._log.info("recovery progress: %s", Counts(
                c.total, c.committed, c.rolled_back, c.skipped, c.remaining, "finished",
                c.seconds).line(self.dry_run))

    def _update(self, total: int | None = None, phase: str | None = None) -> None:
        with self._lock:
            c = self._counts
            self._counts = Counts(c.total if total is None else total, c.committed,
                                  c.rolled_back, c.skipped, c.remaining,
                                  c.phase if phase is None else phase)
        self._maybe_log()

    def _maybe_log(self) -> None:
        with self._lock:
            now = self._clock()
            if self._counts.total == 0 or now - self._last_log < self.interval:
                return
            self._last_log = now
            self._logged += 1
        self._log.info("recovery progress: %s", self.snapshot().line(self.dry_run))
        self._draw()

    def _draw(self) -> None:
        if self.display is not None and not self._stop.is_set():
            c = self.snapshot()
            if c.total:
                self.display.show(f"recovery: {c.line(self.dry_run)}")

    def _tick(self) -> None:
        period = self.redraw if self.display is not None else self.interval
        period = max(period, 0.05)
        while not self._stop.wait(period):
            self._maybe_log()
            self._draw()
