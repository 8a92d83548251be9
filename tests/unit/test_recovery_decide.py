"""Recovery's decision, exhaustively, without services: commit exactly when the gid's
own log shows its decision; roll back only on proof of absence; otherwise remain."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from typing import Any

import pytest

from coordinator import Gid
from recovery import InDoubt
from recovery._decide import LogFacts, VerdictKind, decide, search_starts

LOG = "00aa11bb22cc"


def in_doubt(floor: int = 10, partition: int = 2, log: str = LOG, slot: int = 0) -> InDoubt:
    gid = Gid.new("orders", "h", slot, partition, floor, log)
    return InDoubt(gid, datetime.now(UTC), "app", "db", 100.0)


def proven_absent(**overrides: Any) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "fingerprint": LOG, "fenced": True, "reached": frozenset({2}),
        "log_start": {2: 0},
    }
    facts.update(overrides)
    return facts


def test_found_in_its_own_log_commits() -> None:
    t = in_doubt()
    v = decide(t, LogFacts(LOG, found=frozenset({t.text})))
    assert v.kind is VerdictKind.COMMIT


def test_proof_of_absence_rolls_back() -> None:
    assert decide(in_doubt(), LogFacts(**proven_absent())).kind is VerdictKind.ROLL_BACK


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"fingerprint": "ffffffffffff"}, "another topic"),
        ({"fingerprint": None}, "another topic"),
        ({"unusable": "decision topic 'x' not found"}, "not found"),
        ({"fenced": False}, "would fence"),
        ({"fence_failed": {"pk2pc.orders:h:0": "timed out"}}, "fencing"),
        ({"reached": frozenset()}, "could not be read"),
        ({"reached": frozenset({1})}, "could not be read"),
        ({"log_start": {2: 11}}, "records were deleted"),
        ({"log_start": {}}, "records were deleted"),
        ({"compacted": True}, "compacted"),
        ({"partition_problems": {2: "offset 10 is out of range"}}, "out of range"),
    ],
)
def test_anything_short_of_proof_remains(overrides: dict[str, Any], words: str) -> None:
    v = decide(in_doubt(), LogFacts(**proven_absent(**overrides)))
    assert v.kind is VerdictKind.REMAIN
    assert words in v.reason


def test_a_decision_in_another_log_is_not_trusted() -> None:
    # Found a record with the gid, but in a log that is not the gid's: never decide.
    t = in_doubt()
    v = decide(t, LogFacts("ffffffffffff", found=frozenset({t.text}), fenced=True))
    assert v.kind is VerdictKind.REMAIN


def test_log_start_at_the_floor_is_intact() -> None:
    assert decide(in_doubt(floor=10), LogFacts(**proven_absent(log_start={2: 10}))).kind is (
        VerdictKind.ROLL_BACK)


def test_prefenced_transactions_need_no_fence_of_their_own() -> None:
    t = in_doubt()
    facts = proven_absent(fence_failed={t.gid.transactional_id: "x"},
                          prefenced=frozenset({t.text}))
    assert decide(t, LogFacts(**facts)).kind is VerdictKind.ROLL_BACK


def test_roll_back_needs_every_condition() -> None:
    # Exhaustive over the conditions: only the conjunction of all of them rolls back.
    t = in_doubt()
    options: dict[str, list[Any]] = {
        "fingerprint": [LOG, "ffffffffffff"],
        "fenced": [True, False],
        "reached": [frozenset({2}), frozenset()],
        "log_start": [{2: 0}, {2: 11}],
        "compacted": [False, True],
        "fence_failed": [{}, {t.gid.transactional_id: "x"}],
    }
    for values in itertools.product(*options.values()):
        kwargs = dict(zip(options, values, strict=True))
        verdict = decide(t, LogFacts(**kwargs))
        all_good = all(v == options[k][0] for k, v in kwargs.items())
        assert (verdict.kind is VerdictKind.ROLL_BACK) is all_good, kwargs
        assert verdict.kind is not VerdictKind.COMMIT


def test_search_starts_at_the_lowest_floor_of_each_partition() -> None:
    ts = [in_doubt(floor=50, partition=1), in_doubt(floor=7, partition=1),
          in_doubt(floor=3, partition=0)]
    assert search_starts(ts) == {1: 7, 0: 3}


def test_a_decision_found_before_kafka_failed_is_still_applied() -> None:
    # One transient failure must not throw away what was already decided.
    t, other = in_doubt(), in_doubt(slot=1)
    facts = LogFacts(LOG, unusable="decision log unreachable: _TRANSPORT",
                     found=frozenset({t.text}))
    assert decide(t, facts).kind is VerdictKind.COMMIT
    assert decide(other, facts).kind is VerdictKind.REMAIN
    # ... but only when the log was identified as the gid's own.
    assert decide(t, LogFacts(None, unusable="x", found=frozenset({t.text}))).kind is (
        VerdictKind.REMAIN)
