"""The protocol state machine: every allowed transition, every illegal one, and
what to do when the Kafka commit fails."""

from __future__ import annotations

import itertools

import pytest

from coordinator import Status
from coordinator._protocol import (
    CommitAction,
    Event,
    IllegalTransition,
    KafkaErrorKind,
    Protocol,
    commit_action,
)

# The protocol as the issue describes it, written out independently of the
# implementation's table so a change to either is noticed.
ALLOWED: dict[tuple[Status, Event], Status] = {
    (Status.ACTIVE, Event.BLOCK_FAILED): Status.ROLLED_BACK,
    (Status.ACTIVE, Event.PREPARE_FAILED): Status.ROLLED_BACK,
    (Status.ACTIVE, Event.FAILED_BEFORE_COMMIT): Status.ROLLED_BACK,
    (Status.ACTIVE, Event.PREPARED): Status.PREPARED,
    (Status.ACTIVE, Event.ONE_PHASE_COMMITTED): Status.COMMITTED,
    (Status.PREPARED, Event.FAILED_BEFORE_COMMIT): Status.ROLLED_BACK,
    (Status.PREPARED, Event.KAFKA_COMMIT_STARTED): Status.COMMITTING,
    (Status.COMMITTING, Event.KAFKA_COMMITTED): Status.DECIDED,
    (Status.COMMITTING, Event.KAFKA_ABORTED): Status.ROLLED_BACK,
    (Status.COMMITTING, Event.KAFKA_OUTCOME_UNKNOWN): Status.IN_DOUBT,
    (Status.DECIDED, Event.PG_COMMITTED): Status.COMMITTED,
}

# How to reach each status from ACTIVE.
PATH_TO: dict[Status, list[Event]] = {
    Status.ACTIVE: [],
    Status.PREPARED: [Event.PREPARED],
    Status.COMMITTING: [Event.PREPARED, Event.KAFKA_COMMIT_STARTED],
    Status.DECIDED: [Event.PREPARED, Event.KAFKA_COMMIT_STARTED, Event.KAFKA_COMMITTED],
    Status.COMMITTED: [
        Event.PREPARED, Event.KAFKA_COMMIT_STARTED, Event.KAFKA_COMMITTED, Event.PG_COMMITTED,
    ],
    Status.ROLLED_BACK: [Event.BLOCK_FAILED],
    Status.IN_DOUBT: [Event.PREPARED, Event.KAFKA_COMMIT_STARTED, Event.KAFKA_OUTCOME_UNKNOWN],
}


def protocol_at(status: Status) -> Protocol:
    p = Protocol()
    for event in PATH_TO[status]:
        p.fire(event)
    assert p.status is status
    return p


def test_every_status_is_reachable() -> None:
    assert set(PATH_TO) == set(Status)


def test_starts_active_with_empty_history() -> None:
    p = Protocol()
    assert p.status is Status.ACTIVE
    assert p.history == []
    assert not p.past_commit_point


@pytest.mark.parametrize(
    ("start", "event", "expected"),
    [(s, e, n) for (s, e), n in ALLOWED.items()],
    ids=[f"{s.value}--{e.value}" for (s, e) in ALLOWED],
)
def test_allowed_transition(start: Status, event: Event, expected: Status) -> None:
    p = protocol_at(start)
    before = list(p.history)
    assert p.allows(event)
    assert p.fire(event) is expected
    assert p.status is expected
    assert p.history == [*before, event]


ILLEGAL = [
    (s, e) for s, e in itertools.product(Status, Event) if (s, e) not in ALLOWED
]


@pytest.mark.parametrize(
    ("start", "event"), ILLEGAL, ids=[f"{s.value}--{e.value}" for s, e in ILLEGAL]
)
def test_illegal_transition_raises_and_changes_nothing(start: Status, event: Event) -> None:
    p = protocol_at(start)
    before = list(p.history)
    assert not p.allows(event)
    with pytest.raises(IllegalTransition, match=event.value):
        p.fire(event)
    assert p.status is start
    assert p.history == before


def test_final_statuses_accept_no_event() -> None:
    for status in (Status.COMMITTED, Status.ROLLED_BACK):
        assert status.is_final
        p = protocol_at(status)
        assert not any(p.allows(e) for e in Event)
    for status in set(Status) - {Status.COMMITTED, Status.ROLLED_BACK}:
        assert not status.is_final


def test_in_doubt_is_left_to_recovery() -> None:
    # The coordinator itself never moves an in-doubt transaction on.
    p = protocol_at(Status.IN_DOUBT)
    assert not any(p.allows(e) for e in Event)
    assert not p.past_commit_point


def test_past_commit_point_only_after_kafka_committed() -> None:
    for status in Status:
        p = protocol_at(status)
        assert p.past_commit_point is (status in (Status.DECIDED, Status.COMMITTED))
    # A one-phase commit never went through Kafka: no commit point was passed.
    one_phase = Protocol()
    one_phase.fire(Event.ONE_PHASE_COMMITTED)
    assert one_phase.status is Status.COMMITTED
    assert not one_phase.past_commit_point


def test_no_way_back_from_the_commit_point() -> None:
    p = protocol_at(Status.DECIDED)
    for event in Event:
        if event is not Event.PG_COMMITTED:
            assert not p.allows(event)


@pytest.mark.parametrize(
    ("kind", "retries_left", "action"),
    [
        (KafkaErrorKind.RETRIABLE, True, CommitAction.RETRY),
        (KafkaErrorKind.RETRIABLE, False, CommitAction.LEAVE_IN_DOUBT),
        (KafkaErrorKind.ABORTABLE, True, CommitAction.ABORT),
        (KafkaErrorKind.ABORTABLE, False, CommitAction.ABORT),
        (KafkaErrorKind.FENCED, True, CommitAction.LEAVE_IN_DOUBT),
        (KafkaErrorKind.FENCED, False, CommitAction.LEAVE_IN_DOUBT),
        (KafkaErrorKind.FATAL, True, CommitAction.LEAVE_IN_DOUBT),
        (KafkaErrorKind.FATAL, False, CommitAction.LEAVE_IN_DOUBT),
        (KafkaErrorKind.OTHER, True, CommitAction.LEAVE_IN_DOUBT),
        (KafkaErrorKind.OTHER, False, CommitAction.LEAVE_IN_DOUBT),
    ],
)
def test_commit_action(kind: KafkaErrorKind, retries_left: bool, action: CommitAction) -> None:
    assert commit_action(kind, retries_left) is action


@pytest.mark.parametrize("retries_left", [True, False])
def test_abortable_after_a_retry_is_unknown(retries_left: bool) -> None:
    # A retried commit_transaction() may have had its EndTxn land on the broker: an
    # abortable error after that is no proof of an abort.
    assert commit_action(KafkaErrorKind.ABORTABLE, retries_left, attempts=1) is (
        CommitAction.ABORT)
    for attempts in (2, 3, 10):
        assert commit_action(KafkaErrorKind.ABORTABLE, retries_left, attempts=attempts) is (
            CommitAction.LEAVE_IN_DOUBT)


def test_commit_action_covers_every_kind() -> None:
    for kind, retries_left in itertools.product(KafkaErrorKind, (True, False)):
        assert commit_action(kind, retries_left) in set(CommitAction)
