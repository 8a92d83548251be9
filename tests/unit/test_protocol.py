"""The protocol state machine: every allowed transition, every illegal one, and
what to do when the Kafka commit fails."""

from __future__ import annotations

import itertools

import pytest

from coordinator import OutcomeUnknown, RolledBack, Status
from coordinator._protocol import (
    AFTER_KAFKA,
    CommitAction,
    Event,
    IllegalTransition,
    KafkaErrorKind,
    KafkaOutcome,
    Protocol,
    Then,
    commit_action,
)

# The protocol written out independently of the implementation's table, so a change
# to either is noticed.
ALLOWED: dict[tuple[Status, Event], Status] = {
    (Status.NOT_STARTED, Event.BEGUN): Status.ACTIVE,
    (Status.NOT_STARTED, Event.BEGIN_FAILED): Status.ROLLED_BACK,
    (Status.ACTIVE, Event.BLOCK_FAILED): Status.ROLLED_BACK,
    (Status.ACTIVE, Event.PREPARE_FAILED): Status.ROLLED_BACK,
    (Status.ACTIVE, Event.FAILED_BEFORE_COMMIT): Status.ROLLED_BACK,
    (Status.ACTIVE, Event.PREPARED): Status.PREPARED,
    (Status.ACTIVE, Event.ONE_PHASE_COMMITTED): Status.COMMITTED,
    (Status.ACTIVE, Event.ONE_PHASE_OUTCOME_UNKNOWN): Status.IN_DOUBT,
    (Status.PREPARED, Event.KAFKA_STARTED): Status.COMMITTING,
    (Status.COMMITTING, Event.FAILED_BEFORE_COMMIT): Status.ROLLED_BACK,
    (Status.COMMITTING, Event.KAFKA_COMMITTED): Status.DECIDED,
    (Status.COMMITTING, Event.KAFKA_OUTCOME_UNKNOWN): Status.IN_DOUBT,
    (Status.DECIDED, Event.PG_COMMITTED): Status.COMMITTED,
    (Status.DECIDED, Event.DIVERGED): Status.DIVERGED,
    (Status.ROLLED_BACK, Event.DIVERGED): Status.DIVERGED,
}

# How to reach each status from NOT_STARTED.
_KAFKA = [Event.BEGUN, Event.PREPARED, Event.KAFKA_STARTED]
PATH_TO: dict[Status, list[Event]] = {
    Status.NOT_STARTED: [],
    Status.ACTIVE: [Event.BEGUN],
    Status.PREPARED: [Event.BEGUN, Event.PREPARED],
    Status.COMMITTING: _KAFKA,
    Status.DECIDED: [*_KAFKA, Event.KAFKA_COMMITTED],
    Status.COMMITTED: [*_KAFKA, Event.KAFKA_COMMITTED, Event.PG_COMMITTED],
    Status.ROLLED_BACK: [Event.BEGUN, Event.BLOCK_FAILED],
    Status.IN_DOUBT: [*_KAFKA, Event.KAFKA_OUTCOME_UNKNOWN],
    Status.DIVERGED: [*_KAFKA, Event.KAFKA_COMMITTED, Event.DIVERGED],
}


def protocol_at(status: Status) -> Protocol:
    p = Protocol()
    for event in PATH_TO[status]:
        p.fire(event)
    assert p.status is status
    return p


def allows(p: Protocol, event: Event) -> bool:
    probe = Protocol(p.status)
    try:
        probe.fire(event)
    except IllegalTransition:
        return False
    return True


def test_every_status_is_reachable() -> None:
    assert set(PATH_TO) == set(Status)


def test_starts_not_started() -> None:
    assert Protocol().status is Status.NOT_STARTED


@pytest.mark.parametrize(
    ("start", "event", "expected"),
    [(s, e, n) for (s, e), n in ALLOWED.items()],
    ids=[f"{s.value}--{e.value}" for (s, e) in ALLOWED],
)
def test_allowed_transition(start: Status, event: Event, expected: Status) -> None:
    p = protocol_at(start)
    assert p.fire(event) is expected
    assert p.status is expected


ILLEGAL = [
    (s, e) for s, e in itertools.product(Status, Event) if (s, e) not in ALLOWED
]


@pytest.mark.parametrize(
    ("start", "event"), ILLEGAL, ids=[f"{s.value}--{e.value}" for s, e in ILLEGAL]
)
def test_illegal_transition_raises_and_changes_nothing(start: Status, event: Event) -> None:
    p = protocol_at(start)
    with pytest.raises(IllegalTransition, match=event.value):
        p.fire(event)
    assert p.status is start


def test_final_statuses() -> None:
    assert {s for s in Status if s.is_final} == {
        Status.COMMITTED, Status.ROLLED_BACK, Status.DIVERGED}
    for status in (Status.COMMITTED, Status.DIVERGED):
        assert not any(allows(protocol_at(status), e) for e in Event)
    # Rolled back is final too; only a discovered divergence can follow it.
    assert [e for e in Event if allows(protocol_at(Status.ROLLED_BACK), e)] == [Event.DIVERGED]


def test_in_doubt_is_left_to_recovery() -> None:
    # The coordinator itself never moves an in-doubt transaction on.
    p = protocol_at(Status.IN_DOUBT)
    assert not any(allows(p, e) for e in Event)


def test_no_way_back_from_the_commit_point() -> None:
    p = protocol_at(Status.DECIDED)
    assert {e for e in Event if allows(p, e)} == {Event.PG_COMMITTED, Event.DIVERGED}


@pytest.mark.parametrize("outcome", list(KafkaOutcome))
def test_after_kafka_table(outcome: KafkaOutcome) -> None:
    p = protocol_at(Status.COMMITTING)
    step = p.after_kafka(outcome)
    expected = {
        KafkaOutcome.COMMITTED: (Status.DECIDED, Then.COMMIT_PREPARED, None),
        KafkaOutcome.FAILED_BEFORE_COMMIT: (Status.ROLLED_BACK, Then.ROLLBACK_PREPARED,
                                            RolledBack),
        KafkaOutcome.UNKNOWN: (Status.IN_DOUBT, Then.LEAVE_PREPARED, OutcomeUnknown),
    }[outcome]
    assert (p.status, step.then, step.error) == expected
    assert set(AFTER_KAFKA) == set(KafkaOutcome)


def test_committing_is_observable_while_kafka_runs() -> None:
    p = protocol_at(Status.PREPARED)
    p.fire(Event.KAFKA_STARTED)
    assert p.status is Status.COMMITTING


@pytest.mark.parametrize(
    ("kind", "retries_left", "action"),
    [
        (KafkaErrorKind.RETRIABLE, True, CommitAction.RETRY),
        (KafkaErrorKind.RETRIABLE, False, CommitAction.LEAVE_IN_DOUBT),
        (KafkaErrorKind.ABORTABLE, True, CommitAction.LEAVE_IN_DOUBT),
        (KafkaErrorKind.ABORTABLE, False, CommitAction.LEAVE_IN_DOUBT),
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


def test_commit_action_covers_every_kind() -> None:
    for kind, retries_left in itertools.product(KafkaErrorKind, (True, False)):
        assert commit_action(kind, retries_left) in set(CommitAction)
