"""``python -m recovery status``: what is in doubt, what the decision log says, and
what a recovery run would do now -- changing nothing.

It lists our prepared transactions (``coordinator.prepared.list_prepared``),
reads each decision log the way recovery's first pass does (the worker's
``_learn`` in a dry run: no fence, ``read_committed`` up to the high watermark)
and asks the worker's verdict (:func:`recovery._decide.decide`). Without a fence
the verdict can be certain only when a decision record is visible ("commit").
Otherwise it says what recovery would do once it has fenced: the same verdict
function, given the facts as they are plus a fence and a read to the end --
"roll back after fencing" unless something else (a compacted topic, records
deleted past the gid's floor, the wrong log) would leave it in doubt anyway.

Nothing here fences a ``transactional.id`` (that aborts a live coordinator's
transaction), takes recovery's lock, or finishes a transaction.
"""

from __future__ import annotations

import textwrap
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import Any

import psycopg

from coordinator.gid import check_identifier
from coordinator.prepared import list_prepared
from coordinator.registry import LogRegistry, RegisteredLog

from ._decide import LogFacts, VerdictKind, decide
from ._model import InDoubt, RecoveryReport
from ._worker import RecoveryConfig, RecoveryError, _learn

__all__ = ["Action", "DecisionState", "StatusRow", "StatusView", "status"]


class DecisionState(StrEnum):
    """What the decision log says about a gid (read without a fence)."""

    FOUND = "found"
    """Its decision record is committed in its own log: the outcome is commit."""
    ABSENT = "absent"
    """No decision record up to the partition's high watermark (as of the read)."""
    INCOMPLETE = "incomplete"
    """No decision record as far as the partition could be read (an open
    transaction holds back the last stable offset, or records were deleted)."""
    NOT_READ = "not_read"
    """The log could not be used: no Kafka settings, unreachable, not its log."""


class Action(StrEnum):
    """What a recovery run would do with it now."""

    COMMIT = "commit"
    ROLL_BACK_AFTER_FENCING = "roll_back_after_fencing"
    """Fence the producer, read to the end, roll back if the record is still absent."""
    WAIT = "wait"
    """Within the grace period: left alone."""
    LEAVE = "leave"
    """Left in doubt, with the reason."""
    UNKNOWN = "unknown"
    """The decision log was not read (no Kafka settings)."""


_WRAP = 100
_DECISION_TEXT = {
    DecisionState.FOUND: "commit decision found",
    DecisionState.ABSENT: "none found up to the end",
    DecisionState.INCOMPLETE: "none found so far",
    DecisionState.NOT_READ: "not read",
}
_ACTION_TEXT = {
    Action.COMMIT: "commit",
    Action.ROLL_BACK_AFTER_FENCING: "roll back after fencing",
    Action.WAIT: "wait",
    Action.LEAVE: "leave",
    Action.UNKNOWN: "unknown",
}
_LEGEND = {
    Action.ROLL_BACK_AFTER_FENCING: (
        "roll back after fencing: no decision record is visible. Recovery first fences "
        "the producer's transactional.id (a commit it already sent completes, anything "
        "else it has open is aborted), reads the partition to its end, and commits if "
        "the record appeared after all, else rolls back."),
}


@dataclass(frozen=True, slots=True)
class StatusRow:
    """One in-doubt transaction of ours, as ``status`` shows it."""

    gid: str
    instance: str
    transactional_id: str
    decision_partition: int
    age_seconds: float
    prepared: datetime
    owner: str
    past_grace: bool
    decision: DecisionState
    decision_detail: str
    action: Action
    """What recovery would do now (``WAIT`` within the grace period)."""
    after_grace: Action
    """What it would do once past the grace period (== ``action`` when past it)."""
    reason: str

    def as_json(self) -> dict[str, Any]:
        return {
            "gid": self.gid, "instance": self.instance,
            "transactional_id": self.transactional_id,
            "decision_partition": self.decision_partition,
            "age_seconds": round(self.age_seconds, 3), "prepared": self.prepared.isoformat(),
            "owner": self.owner, "past_grace": self.past_grace,
            "decision_log": self.decision.value, "decision_log_detail": self.decision_detail,
            "action": self.action.value, "after_grace": self.after_grace.value,
            "reason": self.reason,
        }


@dataclass(slots=True)
class StatusView:
    """The whole ``status`` answer: rows oldest first, and a note when the decision
    log was not read."""

    name: str
    instance: str | None
    grace_seconds: float
    decision_log_read: bool
    rows: list[StatusRow] = field(default_factory=list)
    note: str | None = None

    @property
    def past_grace(self) -> list[StatusRow]:
        return [r for r in self.rows if r.past_grace]

    @property
    def exit_code(self) -> int:
        """As ``list``: 1 when something of ours is in doubt past the grace period."""
        return 1 if self.past_grace else 0

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "instance": self.instance, "grace_seconds": self.grace_seconds,
            "decision_log_read": self.decision_log_read, "note": self.note,
            "changed": False, "in_doubt": [r.as_json() for r in self.rows],
        }

    def render(self) -> str:
        """The table for a person on call."""
        who = f"{self.name!r}" + (f", instance {self.instance!r}" if self.instance else "")
        lines = [f"{len(self.rows)} in-doubt transaction(s) of {who}, "
                 f"{len(self.past_grace)} past the grace period of {self.grace_seconds:g}s"]
        if self.note:
            lines.append(f"note: {self.note}")
        elif self.rows:
            lines.append("read-only: the decision log was read without fencing anyone; "
                         "nothing was changed")
        if not self.rows:
            return "\n".join(lines)
        notes: list[str] = []

        def ref(text: str) -> str:
            if text not in notes:
                notes.append(text)
            return f"[{notes.index(text) + 1}]"

        table = [("AGE", "INSTANCE", "DECISION LOG", "RECOVERY WOULD", "GID")]
        for r in self.rows:
            decision = _DECISION_TEXT[r.decision]
            if r.decision in (DecisionState.INCOMPLETE, DecisionState.NOT_READ):
                decision += " " + ref(r.decision_detail)
            if r.action is Action.WAIT:
                left = max(0.0, self.grace_seconds - r.age_seconds)
                action = f"wait: within grace ({_age(left)} left), then "
                action += _ACTION_TEXT[r.after_grace]
            else:
                action = _ACTION_TEXT[r.action]
            if r.after_grace in (Action.LEAVE, Action.UNKNOWN):
                action += " " + ref(r.reason)
            table.append((_age(r.age_seconds), r.instance, decision, action, r.gid))
        widths = [max(len(row[i]) for row in table) for i in range(4)]
        lines.append("")
        for row in table:
            cells = [c.ljust(w) for c, w in zip(row[:4], widths, strict=True)]
            lines.append("  ".join([*cells, row[4]]).rstrip())
        legend = [_LEGEND[a] for a in Action if a in _LEGEND
                  and any(r.after_grace is a for r in self.rows)]
        if notes or legend:
            lines.append("")
        for n, text in enumerate(notes, 1):
            lines.extend(textwrap.wrap(f"[{n}] {text}", _WRAP, subsequent_indent="    "))
        for text in legend:
            lines.extend(textwrap.wrap(text, _WRAP, subsequent_indent="    "))
        return "\n".join(lines)


def status(postgres: str, kafka: Mapping[str, Any] | None, name: str,
           config: RecoveryConfig | None = None) -> StatusView:
    """What is in doubt for ``name`` and what recovery would do; changes nothing.

    ``kafka`` ``None``: PostgreSQL's view only (the decision log is not read).
    Raises :class:`RecoveryError` when PostgreSQL cannot be used.
    """
    cfg = replace(config or RecoveryConfig(), dry_run=True, prefenced=frozenset())
    check_identifier(name, "name")
    try:
        with psycopg.connect(postgres, autocommit=True, connect_timeout=10) as conn:
            in_doubt = list_prepared(conn, name, cfg.instance)
            registered = (LogRegistry(cfg.decision_log_table, cfg.registry_schema)
                          .lookup(conn, name, {t.gid.log for t in in_doubt})
                          if in_doubt and kafka is not None else {})
    except psycopg.Error as exc:
        raise RecoveryError(f"PostgreSQL unreachable: {exc}".strip()) from None
    view = StatusView(name, cfg.instance, cfg.grace_seconds, decision_log_read=kafka is not None)
    if kafka is None:
        view.note = ("no Kafka settings (--bootstrap-servers or $KAFKA_BOOTSTRAP_SERVERS): "
                     "the decision log was not read; this is PostgreSQL's view only")
        view.rows = [_row(t, None, cfg.grace_seconds) for t in in_doubt]
        return view
    facts = _read_logs(kafka, cfg, in_doubt, registered)
    view.rows = [_row(t, facts[t.gid.log], cfg.grace_seconds) for t in in_doubt]
    return view


def _read_logs(kafka: Mapping[str, Any], cfg: RecoveryConfig, in_doubt: list[InDoubt],
               registered: Mapping[str, RegisteredLog]) -> dict[str, LogFacts]:
    """Each decision log's facts, read as recovery's unfenced first pass reads them
    (all our gids, also those within the grace period)."""
    by_log: dict[str, list[InDoubt]] = defaultdict(list)
    for t in in_doubt:
        by_log[t.gid.log].append(t)
    scratch = RecoveryReport(dry_run=True)
    facts = {fp: _learn(kafka, cfg, fp, group, registered.get(fp), scratch)
             for fp, group in sorted(by_log.items())}
    assert not scratch.fenced, "status must never fence"
    return facts


def _row(t: InDoubt, facts: LogFacts | None, grace: float) -> StatusRow:
    if facts is None:
        unread = "the decision log was not read (no Kafka settings)"
        decision, detail, action, reason = (DecisionState.NOT_READ, unread, Action.UNKNOWN,
                                            unread)
    else:
        decision, detail, action, reason = _explain(t, facts)
    past = t.age_seconds >= grace
    return StatusRow(
        gid=t.text, instance=t.gid.instance, transactional_id=t.gid.transactional_id,
        decision_partition=t.gid.partition, age_seconds=t.age_seconds, prepared=t.prepared,
        owner=t.owner, past_grace=past, decision=decision, decision_detail=detail,
        action=action if past else Action.WAIT, after_grace=action, reason=reason)


def _explain(t: InDoubt, facts: LogFacts) -> tuple[DecisionState, str, Action, str]:
    """(decision state, its detail, action past the grace period, reason) for one gid,
    from the worker's verdict on facts learned without a fence."""
    verdict = decide(t, facts)
    if verdict.kind is VerdictKind.COMMIT:
        return DecisionState.FOUND, verdict.reason, Action.COMMIT, verdict.reason
    if facts.fingerprint != t.gid.log or facts.unusable is not None:
        return DecisionState.NOT_READ, verdict.reason, Action.LEAVE, verdict.reason
    p = t.gid.partition
    if p in facts.partition_problems:
        state, detail = DecisionState.INCOMPLETE, facts.partition_problems[p]
    elif p in facts.reached:
        state, detail = DecisionState.ABSENT, (
            f"no decision record in partition {p} from the gid's floor {t.gid.floor} up to "
            "its high watermark")
    else:
        state, detail = DecisionState.INCOMPLETE, (
            f"partition {p} could not be read up to its high watermark without fencing: "
            "an open Kafka transaction holds back its last stable offset (a live or "
            "crashed producer; the broker aborts it after its transaction.timeout.ms)")
    # What recovery would conclude once the producer is fenced and the partition read to
    # its end: the same verdict function, on the facts as they are plus that.
    after = decide(t, replace(facts, fenced=True, reached=facts.reached | {p}))
    if after.kind is VerdictKind.ROLL_BACK:
        return state, detail, Action.ROLL_BACK_AFTER_FENCING, (
            f"no decision record visible; recovery would fence {t.gid.transactional_id}, "
            f"read partition {p} to its end and roll back if it is still absent")
    return state, detail, Action.LEAVE, after.reason


def _age(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
