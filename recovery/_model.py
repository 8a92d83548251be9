"""Records of what recovery found and did."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from coordinator.prepared import PreparedTransaction

__all__ = ["InDoubt", "RecoveryReport", "Remaining"]


InDoubt = PreparedTransaction
"""A prepared transaction of ours, as ``pg_prepared_xacts`` shows it."""


@dataclass(frozen=True, slots=True)
class Remaining:
    """A transaction recovery could not resolve in this run, and why."""

    gid: str
    reason: str


@dataclass(slots=True)
class RecoveryReport:
    """What one recovery run found and did.

    ``committed`` and ``rolled_back`` list the gids this run resolved;
    ``remaining`` those still in doubt past the grace period (with reasons);
    ``skipped`` those resolved by someone else meanwhile; ``waiting`` those
    younger than the grace period (left alone on purpose).
    """

    committed: list[str] = field(default_factory=list)
    rolled_back: list[str] = field(default_factory=list)
    remaining: list[Remaining] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)
    fenced: list[str] = field(default_factory=list)
    dry_run: bool = False
    oldest_age_seconds: float | None = None
    ages: dict[str, float] = field(default_factory=dict)
    duration_seconds: float | None = None

    @property
    def in_doubt(self) -> list[str]:
        """The gids left prepared after this run, as far as it knows
        (``remaining`` and ``waiting``)."""
        return [r.gid for r in self.remaining] + list(self.waiting)

    @property
    def oldest_in_doubt_age_seconds(self) -> float | None:
        """Age, when the run started, of the oldest transaction left in doubt
        (``None``: none left)."""
        ages = [self.ages[g] for g in self.in_doubt if g in self.ages]
        return max(ages) if ages else None

    @property
    def ok(self) -> bool:
        """True when nothing of ours remains in doubt past the grace period.

        A dry run changes nothing, so it is ok only when it found nothing to do.
        """
        if self.dry_run and (self.committed or self.rolled_back):
            return False
        return not self.remaining

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def as_json(self) -> dict[str, Any]:
        return {
            "committed": list(self.committed),
            "rolled_back": list(self.rolled_back),
            "remaining": [r.gid for r in self.remaining],
            "remaining_reasons": {r.gid: r.reason for r in self.remaining},
            "skipped": list(self.skipped),
            "waiting": list(self.waiting),
            "fenced_transactional_ids": list(self.fenced),
            "dry_run": self.dry_run,
            "oldest_age_seconds": self.oldest_age_seconds,
        }
