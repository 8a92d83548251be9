"""Every log record of the library carries the fields ``gid``, ``phase``,
``pk2pc_name`` and ``instance``: checked on the source (every logging call passes
``extra=``) and on records the consume loop and recovery really emit."""

from __future__ import annotations

import ast
import logging
from pathlib import Path
from typing import Any, cast

import pytest
from confluent_kafka import Consumer, Message

from coordinator._consumecore import (
    ConsumeEffect,
    ConsumeLoop,
    ConsumeSettings,
    Transact,
    handler_failures,
)
from coordinator._effects import Blocking, Sleep, drive, run_now
from coordinator._logging import log_extra
from recovery import RecoveryConfig, RecoveryReport
from recovery._logfields import fields
from recovery._worker import _apply
from tests.fakes import FakeConsumer

ROOT = Path(__file__).resolve().parents[2]
FIELDS = ("gid", "phase", "pk2pc_name", "instance")
GID = "pk2pc2:orders:i-1:3:2:17:0123456789ab:" + "f" * 32
LEVELS = {"debug", "info", "warning", "error", "critical", "exception", "log"}

KNOWN_WITHOUT_FIELDS: set[tuple[str, str]] = set()


def scan(source: str, filename: str) -> list[tuple[str, int, str, bool]]:
    """(file, line, message, has extra=) of every ``log.<level>(...)`` call in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in LEVELS and isinstance(node.func.value, ast.Name)
                and node.func.value.id in ("log", "logger")):
            first = node.args[0] if node.args else None
            message = (first.value if isinstance(first, ast.Constant)
                       and isinstance(first.value, str) else "?")
            has_extra = any(k.arg == "extra" for k in node.keywords)
            found.append((filename, node.lineno, message, has_extra))
    return found


def logging_calls() -> list[tuple[str, int, str, bool]]:
    found = []
    for package in ("coordinator", "recovery"):
        for path in sorted((ROOT / package).glob("*.py")):
            found += scan(path.read_text(), str(path.relative_to(ROOT)))
    return found


def values(record: logging.LogRecord) -> tuple[object, ...]:
    """The record's four fields (each must be there, ``None`` or not)."""
    return tuple(record.__dict__[f] for f in FIELDS)


def test_every_logging_call_passes_the_fields() -> None:
    calls = logging_calls()
    assert len(calls) > 30  # the scan sees the library's calls
    missing = [(f, line, m) for f, line, m, has_extra in calls
               if not has_extra and (f, m) not in KNOWN_WITHOUT_FIELDS]
    assert missing == []


def test_log_extra_names_the_owner_from_a_gid_or_a_transactional_id() -> None:
    assert log_extra(gid=GID, phase="prepare") == {
        "gid": GID, "phase": "prepare", "pk2pc_name": "orders", "instance": "i-1"}
    assert log_extra(transactional_id="pk2pc.orders:i-1:3") == {
        "gid": None, "phase": None, "pk2pc_name": "orders", "instance": "i-1"}
    assert log_extra(gid="(txid abc)", name="n", instance="i") == {
        "gid": "(txid abc)", "phase": None, "pk2pc_name": "n", "instance": "i"}
    assert fields(gid=GID) == {"gid": GID, "phase": "recovery", "pk2pc_name": "orders",
                               "instance": "i-1"}
    assert fields(transactional_id="pk2pc.orders:i-1:0") == {
        "gid": None, "phase": "recovery", "pk2pc_name": "orders", "instance": "i-1"}


def test_a_consume_loop_record_carries_the_fields(caplog: pytest.LogCaptureFixture) -> None:
    messages = [Message(topic="in", partition=0, offset=o, key=b"k", value=b"v",
                        headers=None, error=None) for o in (0, 1)]
    consumer = FakeConsumer([messages])

    async def perform(effect: ConsumeEffect) -> Any:
        match effect:
            case Blocking(call):
                return call()
            case Sleep():
                return None
            case Transact(batch):
                if len(batch) > 1:
                    with handler_failures():
                        raise ValueError("fails as a pair")
        return None

    loop = ConsumeLoop(cast(Consumer, consumer), ConsumeSettings(), lambda: consumer.done,
                       1.0, "orders", "i-1")
    caplog.set_level(logging.DEBUG, logger="coordinator")
    run_now(drive(loop.run(), perform))
    [record] = [r for r in caplog.records if "splitting it" in r.getMessage()]
    assert values(record) == (None, "consume", "orders", "i-1")


def test_a_recovery_record_carries_the_fields(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="recovery")
    report = RecoveryReport(dry_run=True)
    _apply(cast(Any, None), "unused", RecoveryConfig(dry_run=True), {GID: True}, report)
    assert report.committed == [GID]
    [record] = caplog.records
    assert values(record) == (GID, "recovery", "orders", "i-1")


def test_the_scan_tells_calls_with_and_without_fields() -> None:
    source = ('log.warning("x %s", 1)\nlog.info("y", extra={})\n'
              'logger.exception("z")\nother.info("not a logger")\n')
    assert scan(source, "f.py") == [("f.py", 1, "x %s", False), ("f.py", 2, "y", True),
                                     ("f.py", 3, "z", False)]


class _Raising:
    """An observer whose every call raises."""

    def transaction(self, info: object) -> _Raising:
        return self

    def __getattr__(self, name: str) -> object:
        def fail(*args: object) -> None:
            raise RuntimeError(f"observer {name} failed")
        return fail


def test_a_failing_observer_is_logged_with_the_transactions_fields(
        caplog: pytest.LogCaptureFixture) -> None:
    from coordinator._enums import Phase, Status
    from coordinator._observing import Observers

    observers = Observers([_Raising()], "orders", "i-1")  # type: ignore[list-item]
    with caplog.at_level(logging.ERROR, logger="coordinator"):
        tx = observers.transaction("txid", None)
        tx.prepared(GID)
        tx.phase(Phase.PREPARE)
        tx.end(Status.COMMITTED, None, None)
    records = [r for r in caplog.records if r.getMessage().startswith("observer failed")]
    assert [r.getMessage() for r in records] == [
        "observer failed in prepared (ignored)", "observer failed in phase (ignored)",
        "observer failed in end (ignored)"]
    for record in records:
        assert (record.pk2pc_name, record.instance, record.gid) == ("orders", "i-1", GID)  # type: ignore[attr-defined]
    assert records[1].phase == "prepare"  # type: ignore[attr-defined]
