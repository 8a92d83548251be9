"""The ``extra`` fields of recovery's log records: the same four as the
coordinator's (``gid``, ``phase``, ``pk2pc_name``, ``instance``), the phase
always ``recovery``; name and instance read from the gid or the
``transactional.id`` when not given."""

from __future__ import annotations

from coordinator.gid import InvalidGid, parse

__all__ = ["PHASE", "fields"]

PHASE = "recovery"


def fields(*, gid: str | None = None, name: str | None = None, instance: str | None = None,
           transactional_id: str | None = None) -> dict[str, object]:
    if gid is not None and (name is None or instance is None):
        try:
            parsed = parse(gid)
        except InvalidGid:
            pass
        else:
            name, instance = name or parsed.name, instance or parsed.instance
    if transactional_id is not None and transactional_id.startswith("pk2pc."):
        parts = transactional_id[len("pk2pc."):].split(":")
        if len(parts) == 3:
            name, instance = name or parts[0], instance or parts[1]
    return {"gid": gid, "phase": PHASE, "pk2pc_name": name, "instance": instance}
