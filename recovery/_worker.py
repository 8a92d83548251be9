"""The recovery algorithm: decide every in-doubt transaction from the decision log.

1. List our prepared transactions for ``name`` in the connected database,
   older than the grace period (a liveness knob: safety never depends on it).
2. Group them by the decision log their gid names (a fingerprint of cluster,
   topic name and topic id). The topic to read comes from the decision-log
   registry table (or ``decision_topic``, which must then match it); a log
   whose fingerprint differs from the gids' is never used to decide them.
3. Read each decision partition (read_committed) from the lowest *floor* of
   its gids -- an offset observed before those transactions prepared -- up to
   what is readable now. A visible decision record means commit, no fence.
4. For the rest, fence each ``transactional.id`` (``init_transactions()``),
   take the high watermark *after* the fences and read on up to it, waiting
   for the last stable offset to get there. Still absent, with the log intact
   from the floor on: roll back. Anything short of that: leave it in doubt.
5. ``COMMIT PREPARED`` / ``ROLLBACK PREPARED``, a few sessions in parallel,
   for everything decided -- also when another log or partition failed.
   Gids finished meanwhile by someone else are skipped; busy ones remain.

The verdict itself is the pure function :func:`recovery._decide.decide`.
Only the first run for a name acts at a time (a PostgreSQL advisory lock);
a second one waits for it and then finds nothing left to do.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import psycopg
from confluent_kafka import KafkaException

from coordinator import CoordinatorConfig, Error
from coordinator.decision_log import DecisionTopic
from coordinator.fencing import fence
from coordinator.gid import check_identifier
from coordinator.prepared import Connection, Finish, finish, list_prepared
from coordinator.registry import LogRegistry, RegisteredLog

from ._decide import LogFacts, VerdictKind, decide, search_starts
from ._kafka import DecisionReader
from ._lock import recovery_lock
from ._logfields import fields
from ._model import InDoubt, RecoveryReport, Remaining
from ._progress import NO_PROGRESS, Outcome, ProgressHook, outcome_of

if TYPE_CHECKING:
    from coordinator import AsyncCoordinator, Coordinator

__all__ = ["RecoveryConfig", "RecoveryError", "arecover_own", "recover", "recover_own"]

log = logging.getLogger("recovery")



class RecoveryError(Error):
    """Configuration or connection error: recovery changed nothing (exit code 2)."""


@dataclass(frozen=True, slots=True)
class RecoveryConfig:
    decision_topic: str | None = None
    """Override of the decision topic. ``None``: the topic each coordinator
    registered (table ``decision_log_table``), else the default topic name.
    When given and a registration exists, they must match. Either way, only a
    log whose fingerprint matches a gid's is used to decide it."""
    grace_seconds: float = 60.0
    """Leave transactions younger than this alone: a live coordinator may still
    be finishing them. A liveness knob: 0 is safe, just disruptive (it rolls
    back transactions a live coordinator was about to commit)."""
    instance: str | None = None
    """Only this coordinator instance's transactions (``None``: all instances)."""
    dry_run: bool = False
    alert_after_seconds: float = 600.0
    """Log an ALERT line for in-doubt transactions older than this."""
    kafka_timeout: float = 10.0
    lso_wait_seconds: float = 30.0
    """How long to wait for the last stable offset to reach the high watermark."""
    stall_seconds: float = 1.0
    concurrency: int = 8
    """PostgreSQL sessions finishing transactions in parallel."""
    lock_wait_seconds: float = 120.0
    transaction_timeout_ms: int | None = None
    """``transaction.timeout.ms`` of the fencing producer (it must be accepted by
    the brokers). ``None``: the kafka settings' value, else the coordinator's
    registered one, else the coordinator's default."""
    decision_log_table: str = CoordinatorConfig().decision_log_table
    registry_schema: str | None = None
    prefenced: frozenset[str] = field(default_factory=frozenset)
    """gids whose producers were already fenced (by a live coordinator's own
    start-up, see ``Coordinator.inherited_gids``): no grace period, no fence."""


def recover(
    postgres: str | Connection,
    kafka: Mapping[str, Any],
    name: str,
    config: RecoveryConfig | None = None,
    *,
    progress: ProgressHook = NO_PROGRESS,
) -> RecoveryReport:
    """Resolve ``name``'s in-doubt transactions; see the module docstring.

    ``postgres`` is a conninfo string or an open connection **in autocommit
    mode** (``COMMIT PREPARED`` cannot run inside a transaction block), of the
    role that prepared the transactions or a superuser.

    Raises :class:`RecoveryError` when PostgreSQL cannot be used (nothing was
    changed). An unreachable decision topic is not an error: nothing is
    touched and the transactions are reported as remaining.

    ``progress`` is told how many transactions are to be resolved and each
    one's outcome as it happens (``recovery._progress``).
    """
    cfg = config or RecoveryConfig()
    check_identifier(name, "name")
    report = RecoveryReport(dry_run=cfg.dry_run)
    started = time.monotonic()
    try:
        conn = (postgres if isinstance(postgres, psycopg.Connection)
                else psycopg.connect(postgres, autocommit=True, connect_timeout=10))
    except psycopg.Error as exc:
        raise RecoveryError(f"PostgreSQL unreachable: {exc}".strip()) from None
    try:
        with recovery_lock(conn, name, cfg.lock_wait_seconds) as locked:
            in_doubt = list_prepared(conn, name, cfg.instance)
            report.ages = {t.text: t.age_seconds for t in in_doubt}
            if not locked:
                for t in in_doubt:
                    report.remaining.append(Remaining(t.text, "another recovery worker for "
                                                      f"{name!r} holds the lock"))
                return report
            registry = LogRegistry(cfg.decision_log_table, cfg.registry_schema)
            registered = registry.lookup(conn, name, {t.gid.log for t in in_doubt})
            _run(conn, postgres, kafka, cfg, in_doubt, registered, report, progress, name)
    except psycopg.OperationalError as exc:
        raise RecoveryError(f"PostgreSQL connection failed: {exc}".strip()) from None
    finally:
        if conn is not postgres:
            conn.close()
        report.duration_seconds = time.monotonic() - started
    return report


def recover_own(coordinator: Coordinator, kafka: Mapping[str, Any],
                config: RecoveryConfig | None = None) -> RecoveryReport:
    """Recover an open coordinator's own earlier transactions at start-up.

    The coordinator's ``open()`` listed its instance's prepared transactions and
    then fenced the instance's producers, so those transactions need no grace
    period and no new fence (which would abort the live coordinator's own
    transactions). Its other transactions get the usual rules.
    """
    cfg = _own_config(coordinator, config)
    with coordinator.connection() as conn:  # the coordinator's own PostgreSQL (same role)
        conn.autocommit = True
        try:
            return recover(conn, kafka, coordinator.name, cfg)
        finally:
            conn.autocommit = False


async def arecover_own(coordinator: AsyncCoordinator, kafka: Mapping[str, Any],
                       config: RecoveryConfig | None = None) -> RecoveryReport:
    """:func:`recover_own` for an :class:`~coordinator.AsyncCoordinator`: the
    same recovery, run in a worker thread so the event loop is never blocked."""
    cfg = _own_config(coordinator, config)
    conn = await coordinator.connect_sync()

    def run() -> RecoveryReport:
        with conn:
            return recover(conn, kafka, coordinator.name, cfg)

    return await asyncio.to_thread(run)


def _own_config(coordinator: Coordinator | AsyncCoordinator,
                config: RecoveryConfig | None) -> RecoveryConfig:
    if coordinator.started_at is None:
        raise RecoveryError("the coordinator is not open")
    return replace(
        config or RecoveryConfig(),
        decision_topic=coordinator.config.decision_topic.name,
        instance=coordinator.instance,
        decision_log_table=coordinator.config.decision_log_table,
        registry_schema=coordinator.config.idempotency_schema,
        prefenced=coordinator.inherited_gids,
    )


def _prefenced(t: InDoubt, cfg: RecoveryConfig) -> bool:
    return t.text in cfg.prefenced


def _run(conn: Connection, postgres: str | Connection, kafka: Mapping[str, Any],
         cfg: RecoveryConfig, in_doubt: list[InDoubt],
         registered: Mapping[str, RegisteredLog], report: RecoveryReport,
         progress: ProgressHook = NO_PROGRESS, name: str | None = None) -> None:
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
            # A human must look: recovery has not resolved it for that long.
            log.error("ALERT gid=%s in doubt for %.0f s (prepared %s): PostgreSQL keeps its "
                      "locks and VACUUM is held back until it is resolved", t.text,
                      t.age_seconds, t.prepared.isoformat(), extra=fields(gid=t.text))
    if not todo:
        log.info("nothing in doubt past the grace period (%d waiting)", len(report.waiting),
                 extra=fields(name=name, instance=cfg.instance))
        return
    log.info("%d in-doubt transaction(s) to resolve", len(todo),
             extra=fields(name=name, instance=cfg.instance))
    progress.planned(len(todo))
    by_log: dict[str, list[InDoubt]] = defaultdict(list)
    for t in todo:
        by_log[t.gid.log].append(t)
    decisions: dict[str, bool] = {}
    for n, (fingerprint, group) in enumerate(sorted(by_log.items()), 1):
        progress.phase(f"decision log {n}/{len(by_log)}: reading")
        facts = _learn(kafka, cfg, fingerprint, group, registered.get(fingerprint), report)
        for t in group:
            verdict = decide(t, facts)
            if verdict.kind is VerdictKind.REMAIN:
                report.remaining.append(Remaining(t.text, verdict.reason))
                log.warning("gid=%s stays in doubt: %s", t.text, verdict.reason,
                            extra=fields(gid=t.text))
                progress.counted(Outcome.REMAINING)
            else:
                decisions[t.text] = verdict.kind is VerdictKind.COMMIT
    progress.phase("finishing")
    _apply(conn, postgres, cfg, decisions, report, progress)


def _learn(kafka: Mapping[str, Any], cfg: RecoveryConfig, fingerprint: str,
           group: list[InDoubt], registered: RegisteredLog | None,
           report: RecoveryReport) -> LogFacts:
    """Read one decision log (fencing where needed) and return what was found.

    Never raises for Kafka trouble: what was learned before it is returned, and
    the rest stays in doubt with the reason.
    """
    topic = cfg.decision_topic or (registered.topic if registered else DecisionTopic().name)
    if cfg.decision_topic and registered and registered.topic != cfg.decision_topic:
        return LogFacts(None, unusable=(
            f"the decision topic given ({cfg.decision_topic!r}) is not the one its "
            f"coordinator registered ({registered.topic!r} on cluster "
            f"{registered.cluster_id})"))
    where = (f"registered as {registered.topic!r} on cluster {registered.cluster_id}"
             if registered else "not registered")
    found: set[str] = set()
    checked: str | None = None  # the log's fingerprint, once it matched
    try:
        with DecisionReader(kafka, topic, cfg.kafka_timeout) as reader:
            try:
                dlog = reader.describe()
            except LookupError as exc:
                return LogFacts(None, unusable=f"{exc}; its decision log {fingerprint} is "
                                f"{where}")
            if dlog.fingerprint != fingerprint:
                return LogFacts(dlog.fingerprint, unusable=(
                    f"topic {topic!r} on cluster {dlog.cluster_id} (topic id "
                    f"{dlog.topic_id}) is not its decision log {fingerprint} ({where}): "
                    "wrong topic, wrong cluster, or the topic was deleted and re-created"))
            checked = dlog.fingerprint
            wanted: dict[int, set[str]] = defaultdict(set)
            for t in group:
                wanted[t.gid.partition].add(t.text)
            reader.plan(wanted, search_starts(group))

            # Pass 1: whatever is readable now, no fence. A visible decision is final.
            try:
                first = reader.read_until(reader.high_watermarks(), stall=cfg.stall_seconds,
                                          deadline=time.monotonic() + cfg.lso_wait_seconds)
            finally:
                found = reader.found()
            absent = [t for t in group if t.text not in found]
            base = LogFacts(dlog.fingerprint, compacted=dlog.compacted,
                            unclean=dlog.unclean_leader_election, found=frozenset(found))
            if not absent:
                return base
            if cfg.dry_run:
                # No fence, so no conclusion; how far the read got, for whoever
                # explains the verdict (``recovery status``).
                return replace(base, reached=frozenset(first), log_start=reader.log_starts(),
                               partition_problems=reader.problems())

            # Pass 2: fence, then read up to the high watermark as of after the fence.
            prefenced = frozenset(t.text for t in absent if _prefenced(t, cfg))
            to_fence = sorted({t.gid.transactional_id for t in absent
                               if t.text not in prefenced})
            timeout_ms = _fence_timeout_ms(kafka, cfg, registered)
            failed = _fence_all(kafka, to_fence, cfg.kafka_timeout, timeout_ms, report)
            end = reader.high_watermarks()
            try:
                reached = reader.read_until(end, stall=cfg.lso_wait_seconds,
                                            deadline=time.monotonic() + cfg.lso_wait_seconds)
            finally:
                found = reader.found()
            return LogFacts(
                dlog.fingerprint, compacted=dlog.compacted,
                unclean=dlog.unclean_leader_election, found=frozenset(found),
                fenced=True, fence_failed=failed, prefenced=prefenced,
                reached=frozenset(reached), log_start=reader.log_starts(),
                partition_problems=reader.problems())
    except KafkaException as exc:
        # Decisions already seen stay valid: commit those, leave the rest in doubt.
        # Left in doubt and retried by the next run (exit code 1 says so).
        log.warning("decision log %s (topic %r): %s", fingerprint, topic, exc,
                    extra=fields(name=group[0].gid.name))
        return LogFacts(checked, unusable=f"decision log unreachable: {exc}",
                        found=frozenset(found))


def _fence_timeout_ms(kafka: Mapping[str, Any], cfg: RecoveryConfig,
                      registered: RegisteredLog | None) -> int:
    if cfg.transaction_timeout_ms is not None:
        return cfg.transaction_timeout_ms
    if "transaction.timeout.ms" in kafka:
        return int(kafka["transaction.timeout.ms"])
    if registered is not None:
        return registered.transaction_timeout_ms
    return CoordinatorConfig().transaction_timeout_ms


def _fence_all(kafka: Mapping[str, Any], tids: list[str], timeout: float,
               transaction_timeout_ms: int, report: RecoveryReport) -> dict[str, str]:
    failed: dict[str, str] = {}
    if not tids:
        return failed

    def one(tid: str) -> tuple[str, str | None]:
        try:
            fence(tid, dict(kafka), timeout, transaction_timeout_ms)
            return tid, None
        except KafkaException as exc:
            return tid, str(exc)

    with ThreadPoolExecutor(max_workers=min(8, len(tids))) as ex:
        for tid, err in ex.map(one, tids):
            if err is None:
                report.fenced.append(tid)
                log.info("fenced transactional.id %s", tid, extra=fields(transactional_id=tid))
            else:
                failed[tid] = err
                # Left in doubt and retried by the next run (exit code 1 says so).
                log.warning("fencing transactional.id %s failed: %s", tid, err,
                            extra=fields(transactional_id=tid))
    return failed


def _apply(conn: Connection, postgres: str | Connection, cfg: RecoveryConfig,
           decisions: dict[str, bool], report: RecoveryReport,
           progress: ProgressHook = NO_PROGRESS) -> None:
    if cfg.dry_run:
        for gid, commit in decisions.items():
            (report.committed if commit else report.rolled_back).append(gid)
            progress.counted(Outcome.COMMITTED if commit else Outcome.ROLLED_BACK)
            log.info("dry run: would %s gid=%s", "commit" if commit else "roll back", gid,
                     extra=fields(gid=gid))
        return
    items = list(decisions.items())
    if not items:
        return
    workers = max(1, min(cfg.concurrency, len(items) // 50 + 1))

    def run_chunk(chunk: list[tuple[str, bool]], own: bool) -> list[tuple[str, bool, str]]:
        out: list[tuple[str, bool, str]] = []

        def note(gid: str, commit: bool, outcome: str) -> None:
            out.append((gid, commit, outcome))
            progress.counted(outcome_of(commit, outcome))

        try:
            c = conn if own else _connect_like(postgres)
        except psycopg.Error as exc:
            # Other sessions may already have acted: report, do not raise (an
            # exception here would claim that nothing was changed).
            for gid, commit in chunk:
                note(gid, commit, f"error: cannot connect: {exc}".strip())
            return out
        try:
            for gid, commit in chunk:
                try:
                    outcome = finish(c, gid, commit)
                except psycopg.Error as exc:
                    note(gid, commit, f"error: {exc}".strip())
                    if c.closed or c.broken:
                        for g, cm in chunk[len(out):]:
                            note(g, cm, "error: connection lost")
                        break
                    continue
                note(gid, commit, outcome.value)
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
        if outcome == Finish.DONE.value:
            (report.committed if commit else report.rolled_back).append(gid)
            log.info("gid=%s %s: %s", gid, verb, reason, extra=fields(gid=gid))
        elif outcome == Finish.GONE.value:
            report.skipped.append(gid)
            log.info("gid=%s already resolved by another session; skipped", gid,
                     extra=fields(gid=gid))
        elif outcome == Finish.BUSY.value:
            report.remaining.append(Remaining(gid, "busy: another session is finishing it"))
            log.warning("gid=%s busy (another session is finishing it)", gid,
                        extra=fields(gid=gid))
        else:
            report.remaining.append(Remaining(gid, f"{verb} failed: {outcome}"))
            log.error("gid=%s %s failed: %s", gid, verb, outcome, extra=fields(gid=gid))


def _connect_like(postgres: str | Connection) -> Connection:
    assert isinstance(postgres, str)
    return psycopg.connect(postgres, autocommit=True, connect_timeout=10)

