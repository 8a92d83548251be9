"""The ``extra`` fields every log record of the library carries."""

from __future__ import annotations

from .gid import InvalidGid, parse

__all__ = ["log_extra"]


def log_extra(*, gid: str | None = None, phase: object = None, name: str | None = None,
              instance: str | None = None,
              transactional_id: str | None = None) -> dict[str, object]:
    """``extra=`` for a log call: the record gets attributes ``gid``, ``phase``,
    ``pk2pc_name`` (``name`` is the logger's own attribute of every
    ``LogRecord``) and ``instance`` (``None`` when unknown), so JSON log
    formatters can index them.

    ``name`` and ``instance`` not given are taken from the gid, or from a
    producer's ``transactional_id`` (``pk2pc.<name>:<instance>:<slot>``), when
    either is one of this library's."""
    if name is None or instance is None:
        found = _owner(gid, transactional_id)
        if found is not None:
            name = found[0] if name is None else name
            instance = found[1] if instance is None else instance
    return {"gid": gid, "phase": None if phase is None else str(phase),
            "pk2pc_name": name, "instance": instance}


def _owner(gid: str | None, transactional_id: str | None) -> tuple[str, str] | None:
    if gid is not None:
        try:
            parsed = parse(gid)
        except InvalidGid:
            pass
        else:
            return parsed.name, parsed.instance
    if transactional_id is not None and transactional_id.startswith("pk2pc."):
        parts = transactional_id[len("pk2pc."):].split(":")
        if len(parts) == 3:
            return parts[0], parts[1]
    return None
