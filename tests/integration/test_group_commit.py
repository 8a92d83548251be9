"""Group commit against the real services: members really share one Kafka
transaction; a failed shared commit rolls every member back; a member whose
PREPARE fails does not break the others. Both sides are checked every time."""

from __future__ import annotations

import itertools
import json
import threading
from typing import TYPE_CHECKING

import pytest

from coordinator import Coordinator, GroupCommit, RolledBack, Status
from coordinator.gid import parse

if TYPE_CHECKING:
    from tests.integration.conftest import Env

pytestmark = pytest.mark.integration

MEMBERS = 6


BOTH_DRIVERS = True  # each env test runs with Coordinator and with AsyncCoordinator


def run_members(coord: Coordinator, topic: str, bad: int | None = None, bad_kind: str = "",
                ) -> dict[int, tuple[Status, str | None, BaseException | None]]:
    """MEMBERS threads end their blocks together; member ``bad`` misbehaves."""
    barrier = threading.Barrier(MEMBERS)
    out: dict[int, tuple[Status, str | None, BaseException | None]] = {}
    lock = threading.Lock()

    def member(i: int) -> None:
        tx = coord.transaction()
        err: BaseException | None = None
        try:
            with tx:
                tx.execute("INSERT INTO orders (id, total) VALUES (%s, %s)", (i, i))
                if i == bad and bad_kind == "prepare":
                    tx.execute("INSERT INTO invoices (id, customer) VALUES (%s, 999)", (i,))
                value = b"x" * 5000 if i == bad and bad_kind == "kafka" else json.dumps(
                    {"op": i}).encode()
                tx.produce(topic, key=str(i), value=value)
                barrier.wait(10)
        except RolledBack as exc:
            err = exc
        with lock:
            out[i] = (tx.status, tx.gid, err)

    threads = [threading.Thread(target=member, args=(i,)) for i in range(MEMBERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(out) == MEMBERS
    return out


def check_both_sides(env: Env, topic: str, committed: set[int]) -> None:
    assert set(env.ids()) == committed
    ops = [json.loads(r.value or b"{}")["op"] for r in env.read(topic)]
    assert sorted(ops) == sorted(committed)  # each committed op exactly once, nothing else
    assert env.prepared() == []


def test_members_share_one_kafka_transaction(env: Env, orders: str) -> None:
    topic = env.topic()
    # One producer and a generous wait: the six members end up in one or few batches.
    coord = env.coordinator(producers=1, group_commit=GroupCommit(max_wait=1.0))
    out = run_members(coord, topic)
    assert all(status is Status.COMMITTED for status, _, _ in out.values())
    check_both_sides(env, topic, set(range(MEMBERS)))
    decisions = env.decisions()
    gids = {gid for _, gid, _ in out.values()}
    assert set(decisions) == gids
    # Records of one Kafka transaction sit next to each other; separate transactions are
    # separated by a commit marker. So consecutive decision offsets prove sharing.
    offsets = sorted(rec.offset for rec in decisions.values())
    assert len({parse(str(g)).partition for g in gids}) == 1
    assert any(b - a == 1 for a, b in itertools.pairwise(offsets)), offsets


def test_failed_shared_commit_rolls_back_every_member(env: Env, orders: str) -> None:
    topic = env.topic(config={"max.message.bytes": "1000"})
    coord = env.coordinator(producers=1, group_commit=GroupCommit(max_wait=1.0))
    out = run_members(coord, topic, bad=0, bad_kind="kafka")
    bad_status, _, bad_err = out[0]
    assert bad_status is Status.ROLLED_BACK and bad_err is not None
    assert "MSG_SIZE_TOO_LARGE" in str(bad_err)
    rolled_back = {i for i, (s, _, _) in out.items() if s is Status.ROLLED_BACK}
    committed = {i for i, (s, _, _) in out.items() if s is Status.COMMITTED}
    assert rolled_back | committed == set(range(MEMBERS))
    assert len(rolled_back) >= 2, "the bad member's batch had no other member"
    for i in rolled_back:
        assert isinstance(out[i][2], RolledBack)
    check_both_sides(env, topic, committed)
    assert set(env.decisions()) == {out[i][1] for i in committed}


def test_member_failing_at_prepare_does_not_break_the_others(env: Env, orders: str) -> None:
    env.execute("CREATE TABLE customers (id int PRIMARY KEY)")
    env.execute("CREATE TABLE invoices (id int PRIMARY KEY, customer int NOT NULL "
                "REFERENCES customers DEFERRABLE INITIALLY DEFERRED)")
    topic = env.topic()
    coord = env.coordinator(producers=1, group_commit=GroupCommit(max_wait=1.0))
    out = run_members(coord, topic, bad=3, bad_kind="prepare")
    assert out[3][0] is Status.ROLLED_BACK and "foreign key" in str(out[3][2])
    others = set(range(MEMBERS)) - {3}
    assert {i for i, (s, _, _) in out.items() if s is Status.COMMITTED} == others
    check_both_sides(env, topic, others)
    assert set(env.decisions()) == {out[i][1] for i in others}
