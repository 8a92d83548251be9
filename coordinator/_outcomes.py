"""The errors a caller of a coordinated transaction gets, built in one place."""

from __future__ import annotations

from ._enums import Phase
from ._errmap import describe
from ._kafka import KafkaResult
from .errors import CommittedPendingRecovery, Error, RolledBack, ServiceUnavailable

__all__ = [
    "TopicUnusable",
    "after_kafka_error",
    "before_prepare_reason",
    "committed_pending",
    "rolled_back",
    "unavailable",
]


class TopicUnusable(Exception):
    """A target topic is missing or cannot be checked (raised by the coordinator)."""



def rolled_back(reason: str, phase: Phase, *, gid: str | None = None,
                 complete: bool = True) -> RolledBack:
    return RolledBack(
        f"{reason}; rolled back, nothing published"
        + ("" if complete else "; ROLLBACK PREPARED is left to recovery"),
        gid=gid, phase=phase, complete=complete)


def before_prepare_reason(exc: BaseException) -> str:
    if isinstance(exc, TopicUnusable):
        return str(exc)
    return f"no Kafka producer session ({describe(exc)})"


def after_kafka_error(error: type[Error], result: KafkaResult, gid: str, phase: Phase,
                       complete: bool) -> Error:
    if error is RolledBack:
        what = "produce" if phase is Phase.PRODUCE else "commit"
        return rolled_back(f"Kafka {what} failed ({result.detail})", phase, gid=gid,
                            complete=complete)
    return error(
        f"the Kafka commit outcome is unknown ({result.detail}); the PostgreSQL "
        "transaction stays prepared until the recovery worker decides it from the "
        "decision log", gid=gid, phase=phase)


def committed_pending(exc: BaseException, gid: str | None) -> CommittedPendingRecovery:
    return CommittedPendingRecovery(
        f"the transaction is committed (Kafka commit point passed), but COMMIT "
        f"PREPARED failed ({describe(exc)}); the recovery worker will commit the "
        "PostgreSQL side. Do not retry the operation", gid=gid, phase=Phase.PG_COMMIT)


def unavailable(exc: BaseException, what: str = "PostgreSQL") -> ServiceUnavailable:
    return ServiceUnavailable(f"{what}: {describe(exc)}", phase=Phase.BEGIN)
