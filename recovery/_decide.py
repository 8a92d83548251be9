"""Recovery's decision, free of I/O: what to do with each in-doubt transaction
given what was learned about its decision log.

Commit exactly when a decision record for the gid was read from the gid's own
log. Roll back only when *all* of these hold, after the gid's producer was
fenced: the log read is the one the gid names (same fingerprint: cluster,
topic name, topic id), the partition was read up to its high watermark as of
after the fence, the log still starts at or before the gid's floor (nothing
deleted where the decision could be), and the topic is not compacted.
Anything else: leave it in doubt and say why. Never guess.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from ._model import InDoubt

__all__ = ["LogFacts", "Verdict", "VerdictKind", "decide", "search_starts"]


class VerdictKind(StrEnum):
    COMMIT = "commit"
    ROLL_BACK = "roll_back"
    REMAIN = "remain"


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: VerdictKind
    reason: str


@dataclass(frozen=True, slots=True)
class LogFacts:
    """What recovery learned about one decision log in one run."""

    fingerprint: str | None
    """Of the log actually read, once checked; ``None`` when it could not be
    identified. Nothing in ``found`` counts unless it matches the gid's."""
    unusable: str | None = None
    """Why the log cannot be used at all (topic missing, unreachable, not the
    registered one...)."""
    compacted: bool = False
    unclean: bool = False
    found: frozenset[str] = frozenset()
    fenced: bool = False
    """The fence-then-read pass ran (not in a dry run, not in pass 1 only)."""
    fence_failed: Mapping[str, str] = field(default_factory=dict)
    """transactional.id -> why fencing it failed."""
    prefenced: frozenset[str] = frozenset()
    """gids whose producer a live coordinator fenced itself (``recover_own``)."""
    reached: frozenset[int] = frozenset()
    """Partitions read up to their high watermark as of after the fences (not
    ``fenced``: as of the read without a fence, which never proves absence)."""
    log_start: Mapping[int, int] = field(default_factory=dict)
    """Log-start offset of each partition, taken after the read."""
    partition_problems: Mapping[int, str] = field(default_factory=dict)


def decide(t: InDoubt, facts: LogFacts) -> Verdict:
    """The verdict for one in-doubt transaction."""
    gid = t.gid
    if facts.fingerprint != gid.log:
        return _remain(facts.unusable or (
            f"its decision log is {gid.log}, but the log read is {facts.fingerprint}: "
            "another topic, cluster, or a topic re-created"))
    if t.text in facts.found:
        # Final, whatever went wrong afterwards (a decision read is never retracted).
        return Verdict(VerdictKind.COMMIT, "decision record found in the decision log")
    if facts.unusable is not None:
        return _remain(facts.unusable)
    if not facts.fenced:
        return _remain(f"no decision visible yet; would fence {gid.transactional_id} and "
                       "roll back if it stays absent")
    tid = gid.transactional_id
    if tid in facts.fence_failed and t.text not in facts.prefenced:
        return _remain(f"fencing {tid} failed: {facts.fence_failed[tid]}")
    p = gid.partition
    if p in facts.partition_problems:
        return _remain(facts.partition_problems[p])
    if p not in facts.reached:
        return _remain(f"decision partition {p} could not be read up to its high watermark "
                       "(an open transaction holds back the last stable offset, or Kafka "
                       "is slow)")
    start = facts.log_start.get(p)
    if start is None or start > gid.floor:
        return _remain(f"decision partition {p} starts at offset {start}, after this "
                       f"transaction's floor {gid.floor}: records were deleted (retention, "
                       "DeleteRecords), its decision may have been among them; resolve it "
                       "by hand (see docs/operations.md)")
    if facts.compacted:
        return _remain("the decision topic is compacted: a missing record proves nothing")
    if facts.unclean:
        return _remain("the decision topic allows unclean leader election: a missing "
                       "record proves nothing")
    return Verdict(VerdictKind.ROLL_BACK, "no decision record after fencing the producer")


def _remain(reason: str) -> Verdict:
    return Verdict(VerdictKind.REMAIN, reason)


def search_starts(in_doubt: list[InDoubt]) -> dict[int, int]:
    """Where to start reading each partition: the lowest floor of its gids."""
    starts: dict[int, int] = {}
    for t in in_doubt:
        p = t.gid.partition
        starts[p] = min(starts.get(p, t.gid.floor), t.gid.floor)
    return starts
