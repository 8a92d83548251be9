"""``recovery status`` without services: from the facts an unfenced read learns to the row
shown (what the log says, what recovery would do), and the table's notes."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from coordinator import Gid
from recovery import InDoubt
from recovery._decide import LogFacts
from recovery._status import Action, DecisionState, StatusView, _row

LOG = "00aa11bb22cc"


def in_doubt(age: float = 100.0, floor: int = 10, partition: int = 2) -> InDoubt:
    return InDoubt(Gid.new("orders", "h", 0, partition, floor, LOG), datetime.now(UTC), "app",
                   "db", age)


def unfenced(**overrides: Any) -> LogFacts:
    """What the unfenced read learns about a healthy log in which the gid is absent."""
    facts: dict[str, Any] = {"fingerprint": LOG, "reached": frozenset({2}),
                             "log_start": {2: 0}}
    facts.update(overrides)
    return LogFacts(**facts)


def test_found_commits_for_certain() -> None:
    t = in_doubt()
    r = _row(t, unfenced(found=frozenset({t.text})), grace=60)
    assert (r.decision, r.action, r.after_grace, r.past_grace) == (
        DecisionState.FOUND, Action.COMMIT, Action.COMMIT, True)


def test_absent_to_the_end_rolls_back_only_after_fencing() -> None:
    r = _row(in_doubt(), unfenced(), grace=60)
    assert (r.decision, r.action) == (DecisionState.ABSENT, Action.ROLL_BACK_AFTER_FENCING)
    assert "fence pk2pc.orders:h:0" in r.reason


def test_held_back_partition_is_incomplete() -> None:
    r = _row(in_doubt(), unfenced(reached=frozenset()), grace=60)
    assert (r.decision, r.action) == (DecisionState.INCOMPLETE,
                                      Action.ROLL_BACK_AFTER_FENCING)
    assert "open Kafka transaction" in r.decision_detail


@pytest.mark.parametrize(("overrides", "words"), [
    ({"compacted": True}, "compacted"),
    ({"unclean": True}, "unclean leader election"),
    ({"log_start": {2: 11}}, "records were deleted"),
    ({"partition_problems": {2: "offset 10 of partition 2 is out of range"}}, "out of range"),
])
def test_what_a_fence_would_not_fix_is_left(overrides: dict[str, Any], words: str) -> None:
    r = _row(in_doubt(), unfenced(**overrides), grace=60)
    assert r.action is Action.LEAVE and words in r.reason


@pytest.mark.parametrize(("facts", "words"), [
    (LogFacts(None, unusable="decision log unreachable: timed out"), "unreachable"),
    (LogFacts("ffffffffffff"), "another topic"),
])
def test_unusable_log_is_not_read(facts: LogFacts, words: str) -> None:
    r = _row(in_doubt(), facts, grace=60)
    assert (r.decision, r.action) == (DecisionState.NOT_READ, Action.LEAVE)
    assert words in r.reason


def test_within_grace_waits_and_says_what_comes_next() -> None:
    t = in_doubt(age=5.0)
    r = _row(t, unfenced(found=frozenset({t.text})), grace=60)
    assert (r.past_grace, r.action, r.after_grace) == (False, Action.WAIT, Action.COMMIT)


def test_no_kafka_settings() -> None:
    r = _row(in_doubt(), None, grace=60)
    assert (r.decision, r.action) == (DecisionState.NOT_READ, Action.UNKNOWN)


def test_table_notes_are_shared_and_exit_code_is_as_list() -> None:
    unreachable = LogFacts(None, unusable="decision log unreachable: timed out")
    rows = [_row(in_doubt(age=a), unreachable, grace=60) for a in (300.0, 200.0, 5.0)]
    view = StatusView("orders", None, 60.0, True, rows)
    text = view.render()
    assert text.count("[1]") == 3 * 2 + 1  # each row: its log and action cells; the note
    assert "[2]" not in text
    assert "\n[1] decision log unreachable: timed out" in text
    assert view.exit_code == 1
    assert StatusView("orders", None, 60.0, True, rows[2:]).exit_code == 0
