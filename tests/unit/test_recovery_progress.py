"""Recovery's progress report without services: counts, INFO lines every ``interval``
seconds of an injected clock, the final line of a long run, and the terminal line that
log records never land in the middle of."""

from __future__ import annotations

import io
import logging

import pytest

from coordinator.prepared import Finish
from recovery._progress import Outcome, Progress, TerminalLine, outcome_of


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def progress_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "recovery progress" in r.getMessage()]


def test_outcome_of_finish() -> None:
    assert outcome_of(True, Finish.DONE.value) is Outcome.COMMITTED
    assert outcome_of(False, Finish.DONE.value) is Outcome.ROLLED_BACK
    assert outcome_of(True, Finish.GONE.value) is Outcome.SKIPPED
    assert outcome_of(False, Finish.BUSY.value) is Outcome.REMAINING
    assert outcome_of(True, "error: connection lost") is Outcome.REMAINING


def test_logs_every_interval_and_a_final_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="recovery")
    clock = Clock()
    with Progress(interval=5.0, clock=clock) as p:
        p.planned(4)
        p.phase("finishing")
        p.counted(Outcome.COMMITTED)
        assert progress_lines(caplog) == []  # not 5 s yet
        clock.now += 5.0
        p.counted(Outcome.ROLLED_BACK)
        clock.now += 1.0
        p.counted(Outcome.SKIPPED)  # 1 s after the last line: quiet
        clock.now += 4.0
        p.counted(Outcome.REMAINING)
    assert p.logged == 2
    assert progress_lines(caplog) == [
        "recovery progress: 2/4 done (50%): committed 1, rolled back 1, skipped 0, "
        "left in doubt 0; finishing; 5.0 s",
        "recovery progress: 4/4 done (100%): committed 1, rolled back 1, skipped 1, "
        "left in doubt 1; finishing; 10.0 s",
        "recovery progress: 4/4 done (100%): committed 1, rolled back 1, skipped 1, "
        "left in doubt 1; finished; 10.0 s",
    ]


def test_a_short_run_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="recovery")
    clock = Clock()
    with Progress(interval=5.0, clock=clock) as p:
        p.planned(2)
        p.counted(Outcome.COMMITTED)
        clock.now += 1.0
        p.counted(Outcome.COMMITTED)
    assert progress_lines(caplog) == []


def test_nothing_planned_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="recovery")
    clock = Clock()
    with Progress(interval=0.0, clock=clock) as p:
        p.phase("reading")
        clock.now += 60
    assert progress_lines(caplog) == []


def test_interval_zero_logs_every_change(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="recovery")
    clock = Clock()
    p = Progress(interval=0.0, clock=clock, dry_run=True)
    p.planned(2)
    p.counted(Outcome.COMMITTED)
    p.counted(Outcome.ROLLED_BACK)
    lines = progress_lines(caplog)
    assert [line.split(":")[1].strip() for line in lines] == ["0/2 done (0%)", "1/2 done (50%)",
                                                               "2/2 done (100%)"]
    assert "would commit 1, would roll back 1," in lines[-1]  # a dry run


def test_negative_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="interval"):
        Progress(interval=-1.0)


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_line_is_erased_before_a_log_record() -> None:
    out = Tty()
    line = TerminalLine(out)
    logger = logging.getLogger("test.recovery.progress.tty")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = line.handler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    try:
        clock = Clock()
        p = Progress(interval=0.0, display=line, clock=clock, logger=logger)
        p.planned(1)
        logger.warning("something happened")
        p.counted(Outcome.COMMITTED)
    finally:
        logger.removeHandler(handler)
    drawn = ("\rrecovery: {}/1 done ({}%): committed {}, rolled back 0, skipped 0, "
             "left in doubt 0; starting; 0.0 s\x1b[K")
    erase = "\r\x1b[K"
    # A record erases the progress line first; the line is redrawn after each INFO line.
    assert out.getvalue() == (
        "recovery progress: 0/1 done (0%): committed 0, rolled back 0, skipped 0, "
        "left in doubt 0; starting; 0.0 s\n" + drawn.format(0, 0, 0)
        + erase + "something happened\n"
        + "recovery progress: 1/1 done (100%): committed 1, rolled back 0, skipped 0, "
        "left in doubt 0; starting; 0.0 s\n" + drawn.format(1, 100, 1))
    line.clear()
    assert out.getvalue().endswith(drawn.format(1, 100, 1) + erase)
    line.clear()  # nothing shown: nothing written
    assert out.getvalue().endswith(drawn.format(1, 100, 1) + erase)
