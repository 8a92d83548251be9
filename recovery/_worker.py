"""The recovery algorithm: decide every in-doubt transaction from the decision log.

1. List our prepared transactions for ``name`` in the connected database,
   older than the grace period.
2. Read the decision partitions (read_committed) from a little before the
   oldest prepare time up to what is readable now. A visible decision record
   means commit -- no fence needed.
3. For the rest, fence each ``transactional.id`` (``init_transactions()``),
   take the high watermark *after* the fence and read on up to it, waiting
   for the last stable offset to get there. Found: commit. Absent: roll back.
4. ``COMMIT PREPARED`` / ``ROLLBACK PREPARED``, a few sessions in parallel.
   Gids finished meanwhile by someone else are skipped; busy ones remain.

Only the first run for a name acts at a time (a PostgreSQL advisory lock);
a second one waits for it and then finds nothing left to do.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import psycopg
from confluent_kafka import KafkaException

from coordinator.decision_log import DecisionTopic
from coordinator.gid import check_identifier

from ._kafka import DecisionReader, fence
from ._model import InDoubt, RecoveryReport, Remaining
from ._postgres import FinishOutcome, finish, list_in_doubt, recovery_lock

if TYPE_CHECKING:
    from coordinator import Coordinator

__all__ = ["RecoveryConfig", "RecoveryError", "recover", "recover_own"]

log = logging.getLogger("recovery")

Connection = psycopg.Connection[tuple[object, ...]]


class RecoveryError(Exception):
    """Configuration or connection error: recovery changed nothing (exit code 2)."""


@dataclass(frozen=True, slots=True)
class RecoveryConfig:
    decision_topic: str = DecisionTopic().name
    grace_seconds: float = 60.0
    """Leave transactions younger than this alone: a live coordinator may still
    be finishing them. Keep it well above the coordinator's transaction.timeout.ms."""
    instance: str | None = None
    """Only this coordinator instance's transactions (``None``: all instances)."""
    dry_run: bool = False
    alert_after_seconds: float = 600.0
    """Log an ALERT line for in-doubt transactions older than this."""
    clock_skew_seconds: float = 120.0
    """Margin between PostgreSQL's clock and the producers' record timestamps."""
    retention_margin_seconds: float = 3600.0
    kafka_timeout: float = 10.0
    lso_wait_seconds: float = 30.0
    """How long to wait for the last stable offset to reach the high watermark."""
    stall_seconds: float = 1.0
    concurrency: int = 8
    """PostgreSQL sessions finishing transactions in parallel."""
    lock_wait_seconds: float = 120.0
    prefenced_before: datetime | None = None
    prefenced_ids: frozenset[str] = field(default_factory=frozenset)
    """Transactional ids whose producers were fenced after ``prefenced_before``
    (a live coordinator's own ``init_transactions()``): no fence needed for
    their transactions prepared before then."""


def recover(
    postgres: str | Connection,
    kafka: Mapping[str, Any],
    name: str,
    config: RecoveryConfig | None = None,
) -> RecoveryReport:
    """Resolve ``name``'s in-doubt transactions; see the module docstring.

    ``postgres`` is a conninfo string or an open connection **in autocommit
    mode** (``COMMIT PREPARED`` cannot run inside a transaction block), of the
    role that prepared the transactions or a superuser.

    Raises :class:`RecoveryError` when PostgreSQL cannot be used (nothing was
    changed). An unreachable decision topic is not an error: nothing is
    touched and the transactions are reported as remaining.
    """
    cfg = config or RecoveryConfig()
    check_identifier(name, "name")
    report = RecoveryReport(dry_run=cfg.dry_run)
    try:
        conn = (postgres if isinstance(postgres, psycopg.Connection)
                else psycopg.connect(postgres, autocommit=True, connect_timeout=10))
    except psycopg.Error as exc:
        raise RecoveryError(f"PostgreSQL unreachable: {exc}".strip()) from None
    try:
        with recovery_lock(conn, name, cfg.lock_wait_seconds) as locked:
            in_doubt = list_in_doubt(conn, name, cfg.instance)
            if not locked:
                for t in in_doubt:
                    report.remaining.append(Remaining(t.text, "another recovery worker for "
                                                      f"{name!r} holds the lock"))
                return report
            _run(conn, postgres, kafka, cfg, in_doubt, report)
    except psycopg.OperationalError as exc:
        raise RecoveryError(f"PostgreSQL connection failed: {exc}".strip()) from None
    finally:
        if conn is not postgres:
            conn.close()
    return report


def recover_own(coordinator: Coordinator, kafka: Mapping[str, Any],
                config: RecoveryConfig | None = None) -> RecoveryReport:
    """Recover an open coordinator's own earlier transactions at start-up.

    The coordinator's ``open()`` fenced its instance's producers, so its
    transactions prepared before that need no grace period and no new fence
    (which would abort the live coordinator's own transactions).
    """
    if coordinator.started_at is None:
        raise RecoveryError("the coordinator is not open")
    base = config or RecoveryConfig()
    cfg = RecoveryConfig(
        **{**{f: getattr(base, f) for f in base.__dataclass_fields__},
           "decision_topic": coordinator.config.decision_topic.name,
           "instance": coordinator.instance,
           "prefenced_before": coordinator.started_at,
           "prefenced_ids": frozenset(coordinator.transactional_ids)}
    )
    pool = coordinator._pool  # the coordinator's own PostgreSQL (same role)
    if pool is None:
        raise RecoveryError("the coordinator is not open")
    with pool.connection() as conn:
        conn.autocommit = True
        try:
            return recover(conn, kafka, coordinator.name, cfg)
        finally:
            conn.autocommit = False


def _prefenced(t: InDoubt, cfg: RecoveryConfig) -> bool:
    return (cfg.prefenced_before is not None and t.prepared < cfg.prefenced_before
            and t.gid.transactional_id in cfg.prefenced_ids)


def _run(conn: Connection, postgres: str | Connection, kafka: Mapping[str, Any],
         cfg: RecoveryConfig, in_doubt: list[InDoubt], report: RecoveryReport) -> None:
    todo: list[InDoubt] = []
    for t in in_doubt:
        if t.age_seconds < cfg.grace_seconds and not _prefenced(t, cfg):
            report.waiting.append(t.text)
        else:
            todo.append(t)
    if in_doubt:
        report.oldest_age_seconds = max(t.age_seconds for t in in_doubt)
    for t in todo:
        if t.age_seconds > cfg.alert_after_seconds:
            log.warning("ALERT gid=%s in doubt for %.0f s (prepared %s): PostgreSQL keeps its "
                        "locks and VACUUM is held back until it is resolved", t.text,
                        t.age_seconds, t.prepared.isoformat())
    if not todo:
        log.info("nothing in doubt past the grace period (%d waiting)", len(report.waiting))
        return
    log.info("%d in-doubt transaction(s) to resolve", len(todo))
    try:
        decisions = _decide(kafka, cfg, todo, report)
    except KafkaException as exc:
        reason = f"decision topic unreachable: {exc}"
        log.error("%s; nothing was changed", reason)
        for t in todo:
            if t.text not in {r.gid for r in report.remaining}:
                report.remaining.append(Remaining(t.text, reason))
        return
    _apply(conn, postgres, cfg, decisions, report)


def _decide(kafka: Mapping[str, Any], cfg: RecoveryConfig, todo: list[InDoubt],
            report: RecoveryReport) -> dict[str, bool]:
    """gid -> True (commit) / False (roll back) for every gid that can be decided."""
    decisions: dict[str, bool] = {}
    with DecisionReader(kafka, cfg.decision_topic, cfg.kafka_timeout) as reader:
        reader.check_topic()
        retention_s = reader.retention_seconds()
        by_part: dict[int, list[InDoubt]] = defaultdict(list)
        for t in todo:
            limit = None if retention_s is None else retention_s - cfg.retention_margin_seconds
            if limit is not None and t.age_seconds > limit:
                report.remaining.append(Remaining(
                    t.text, "older than the decision topic's retention: its decision may have "
                    "been deleted; resolve it by hand (see docs/operations.md)"))
                continue
            by_part[t.gid.partition].append(t)
        if not by_part:
            return decisions
        start_ms = {p: int((min(t.prepared for t in ts).timestamp() - cfg.clock_skew_seconds)
                           * 1000) for p, ts in by_part.items()}
        reader.plan({p: {t.text for t in ts} for p, ts in by_part.items()}, start_ms)

        # Pass 1: whatever is readable now, no fence. A visible decision is final.
        now_end = {p: reader.high_watermark(p) for p in by_part}
        reader.read_until(now_end, stall=cfg.stall_seconds,
                          deadline=time.monotonic() + cfg.lso_wait_seconds)
        found = reader.found()
        absent = [t for ts in by_part.values() for t in ts if t.text not in found]
        for ts in by_part.values():
            for t in ts:
                if t.text in found:
                    decisions[t.text] = True
        if not absent:
            return decisions
        if cfg.dry_run:
            for t in absent:
                report.remaining.append(Remaining(
                    t.text, f"dry run: no decision visible yet; would fence "
                    f"{t.gid.transactional_id} and roll back if it stays absent"))
            return decisions

        # Pass 2: fence, then read up to the high watermark as of after the fence.
        to_fence = sorted({t.gid.transactional_id for t in absent if not _prefenced(t, cfg)})
        failed = _fence_all(kafka, to_fence, cfg.kafka_timeout, report)
        candidates = [t for t in absent if t.gid.transactional_id not in failed]
        for t in absent:
            if t.gid.transactional_id in failed:
                report.remaining.append(Remaining(
                    t.text, f"fencing {t.gid.transactional_id} failed: "
                    f"{failed[t.gid.transactional_id]}"))
        parts = {t.gid.partition for t in candidates}
        end = {p: reader.high_watermark(p) for p in parts}
        reached = reader.read_until(end, stall=cfg.lso_wait_seconds,
                                    deadline=time.monotonic() + cfg.lso_wait_seconds)
        found = reader.found()
        for t in candidates:
            if t.text in found:
                decisions[t.text] = True
            elif t.gid.partition in reached:
                decisions[t.text] = False
            else:
                report.remaining.append(Remaining(
                    t.text, f"decision partition {t.gid.partition} could not be read up to "
                    f"its high watermark within {cfg.lso_wait_seconds}s (an open transaction "
                    "holds back the last stable offset)"))
    return decisions


def _fence_all(kafka: Mapping[str, Any], tids: list[str], timeout: float,
               report: RecoveryReport) -> dict[str, str]:
    failed: dict[str, str] = {}
    if not tids:
        return failed

    def one(tid: str) -> tuple[str, str | None]:
        try:
            fence(tid, kafka, timeout)
            return tid, None
        except KafkaException as exc:
            return tid, str(exc)

    with ThreadPoolExecutor(max_workers=min(8, len(tids))) as ex:
        for tid, err in ex.map(one, tids):
            if err is None:
                report.fenced.append(tid)
                log.info("fenced transactional.id %s", tid)
            else:
                failed[tid] = err
                log.error("fencing transactional.id %s failed: %s", tid, err)
    return failed


def _apply(conn: Connection, postgres: str | Connection, cfg: RecoveryConfig,
           decisions: dict[str, bool], report: RecoveryReport) -> None:
    if cfg.dry_run:
        for gid, commit in decisions.items():
            (report.committed if commit else report.rolled_back).append(gid)
            log.info("dry run: would %s gid=%s", "commit" if commit else "roll back", gid)
        return
    items = list(decisions.items())
    if not items:
        return
    workers = max(1, min(cfg.concurrency, len(items) // 50 + 1))

    def run_chunk(chunk: list[tuple[str, bool]], own: bool) -> list[tuple[str, bool, str]]:
        out: list[tuple[str, bool, str]] = []
        try:
            c = conn if own else _connect_like(postgres)
        except psycopg.Error as exc:
            # Other sessions may already have acted: report, do not raise (an
            # exception here would claim that nothing was changed).
            return [(gid, commit, f"error: cannot connect: {exc}".strip())
                    for gid, commit in chunk]
        try:
            for gid, commit in chunk:
                try:
                    outcome = finish(c, gid, commit)
                except psycopg.Error as exc:
                    out.append((gid, commit, f"error: {exc}".strip()))
                    if c.closed or c.broken:
                        for g, cm in chunk[len(out):]:
                            out.append((g, cm, "error: connection lost"))
                        break
                    continue
                out.append((gid, commit, outcome.value))
        finally:
            if c is not conn:
                c.close()
        return out

    results: list[tuple[str, bool, str]] = []
    if workers == 1 or not isinstance(postgres, str):
        results = run_chunk(items, own=True)
    else:
        with ThreadPoolExecutor(max_workers=workers) as ex:
            futs = [ex.submit(run_chunk, items[i::workers], i == 0) for i in range(workers)]
            for f in futs:
                results.extend(f.result())
    for gid, commit, outcome in results:
        verb = "COMMIT PREPARED" if commit else "ROLLBACK PREPARED"
        reason = ("decision record found in the decision log" if commit
                  else "no decision record after fencing the producer")
        if outcome == FinishOutcome.DONE.value:
            (report.committed if commit else report.rolled_back).append(gid)
            log.info("gid=%s %s: %s", gid, verb, reason)
        elif outcome == FinishOutcome.GONE.value:
            report.skipped.append(gid)
            log.info("gid=%s already resolved by another session; skipped", gid)
        elif outcome == FinishOutcome.BUSY.value:
            report.remaining.append(Remaining(gid, "busy: another session is finishing it"))
            log.warning("gid=%s busy (another session is finishing it)", gid)
        else:
            report.remaining.append(Remaining(gid, f"{verb} failed: {outcome}"))
            log.error("gid=%s %s failed: %s", gid, verb, outcome)


def _connect_like(postgres: str | Connection) -> Connection:
    assert isinstance(postgres, str)
    return psycopg.connect(postgres, autocommit=True, connect_timeout=10)

