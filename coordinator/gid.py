"""The PostgreSQL global transaction id (gid) of a coordinated transaction.

Format, version 2 (at most 199 bytes, PostgreSQL's limit)::

    pk2pc2:<name>:<instance>:<slot>:<partition>:<floor>:<log>:<txid>

``name``
    the coordinator's name (one service, one set of transactions);
``instance``
    the coordinator instance (one running process);
``slot``
    the producer slot; with name and instance it gives the Kafka
    ``transactional.id`` (see :func:`transactional_id`);
``partition``
    the decision topic partition the decision record goes to;
``floor``
    an offset of that partition observed *before* PREPARE (the high watermark
    when the producer session started, or past the slot's last delivered
    decision): the decision record, produced after PREPARE, can only be at
    this offset or later. Recovery starts its search here, so the search
    trusts no clock, and it refuses to conclude "no decision" when the
    partition's log no longer starts at or before it (records deleted);
``log``
    a fingerprint of the decision log (Kafka cluster id, topic name, topic
    id; see :func:`coordinator.decision_log.log_fingerprint`): recovery
    refuses to decide from any other log -- a wrong topic, a wrong cluster,
    a topic deleted and re-created;
``txid``
    32 lowercase hex digits, unique per transaction.

Recovery derives from a gid everything it needs: the ``transactional.id`` to
fence, the log and partition to search and where to start. :func:`parse` rejects anything this
library did not make, so recovery never touches a foreign prepared transaction.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

__all__ = [
    "GID_PREFIX",
    "MAX_GID_BYTES",
    "Gid",
    "InvalidGid",
    "check_identifier",
    "parse",
    "transactional_id",
]

GID_PREFIX = "pk2pc2"
MAX_GID_BYTES = 199  # GIDSIZE is 200 including the terminating NUL

_IDENT = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,47}"
_IDENT_RE = re.compile(rf"\A{_IDENT}\Z")
_GID_RE = re.compile(
    rf"\A{GID_PREFIX}:(?P<name>{_IDENT}):(?P<instance>{_IDENT})"
    r":(?P<slot>0|[1-9][0-9]{0,3}):(?P<partition>0|[1-9][0-9]{0,4})"
    r":(?P<floor>0|[1-9][0-9]{0,18}):(?P<log>[0-9a-f]{12}):(?P<txid>[0-9a-f]{32})\Z"
)


class InvalidGid(ValueError):
    """A string that is not a gid made by this library (of a supported version)."""


def check_identifier(value: str, what: str) -> str:
    """Check a name or instance id: 1-48 chars of ``[A-Za-z0-9_.-]``, not starting
    with a punctuation character. Returns it unchanged or raises ValueError."""
    if not isinstance(value, str) or not _IDENT_RE.match(value):
        raise ValueError(
            f"invalid {what} {value!r}: use 1 to 48 characters of letters, digits, "
            "'_', '.', '-', starting with a letter or digit"
        )
    return value


def transactional_id(name: str, instance: str, slot: int) -> str:
    """The Kafka ``transactional.id`` of producer ``slot`` of an instance.

    Stable across restarts of the same instance, so a restarted instance's
    ``init_transactions()`` fences its own zombie; distinct between instances.
    The fields are separated by ``:``, which no identifier contains (``.`` would
    be ambiguous: name ``a.b`` + instance ``c`` vs name ``a`` + instance ``b.c``).
    """
    return f"pk2pc.{name}:{instance}:{slot}"


@dataclass(frozen=True, slots=True)
class Gid:
    """A parsed gid. Build one with :meth:`new`, read one with :func:`parse`."""

    name: str
    instance: str
    slot: int
    partition: int
    floor: int
    log: str
    txid: str

    def __post_init__(self) -> None:
        check_identifier(self.name, "name")
        check_identifier(self.instance, "instance")
        if not 0 <= self.slot <= 9999:
            raise ValueError(f"slot out of range: {self.slot}")
        if not 0 <= self.partition <= 99999:
            raise ValueError(f"partition out of range: {self.partition}")
        if not 0 <= self.floor < 2**63:
            raise ValueError(f"floor out of range: {self.floor}")
        if not re.fullmatch(r"[0-9a-f]{12}", self.log):
            raise ValueError(f"log must be 12 lowercase hex digits: {self.log!r}")
        if not re.fullmatch(r"[0-9a-f]{32}", self.txid):
            raise ValueError(f"txid must be 32 lowercase hex digits: {self.txid!r}")

    @classmethod
    def new(cls, name: str, instance: str, slot: int, partition: int, floor: int,
            log: str) -> Gid:
        return cls(name, instance, slot, partition, floor, log, uuid.uuid4().hex)

    @property
    def transactional_id(self) -> str:
        return transactional_id(self.name, self.instance, self.slot)

    def __str__(self) -> str:
        return (
            f"{GID_PREFIX}:{self.name}:{self.instance}:{self.slot}"
            f":{self.partition}:{self.floor}:{self.log}:{self.txid}"
        )


def parse(text: str) -> Gid:
    """Parse a gid made by this library; raise :class:`InvalidGid` otherwise."""
    if not isinstance(text, str) or len(text.encode("utf-8", "surrogatepass")) > MAX_GID_BYTES:
        raise InvalidGid(f"not a gid of this library: {text!r:.80}")
    m = _GID_RE.match(text)
    if m is None:
        raise InvalidGid(f"not a gid of this library: {text!r:.80}")
    return Gid(
        name=m["name"],
        instance=m["instance"],
        slot=int(m["slot"]),
        partition=int(m["partition"]),
        floor=int(m["floor"]),
        log=m["log"],
        txid=m["txid"],
    )
