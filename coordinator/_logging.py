"""The ``extra`` fields every log record of the library carries."""

from __future__ import annotations

__all__ = ["log_extra"]


def log_extra(*, gid: str | None = None, phase: object = None, name: str | None = None,
              instance: str | None = None) -> dict[str, object]:
    """``extra=`` for a log call: the record gets attributes ``gid``, ``phase``,
    ``pk2pc_name`` (``name`` is the logger's own attribute of every
    ``LogRecord``) and ``instance`` (``None`` when unknown), so JSON log
    formatters can index them."""
    return {"gid": gid, "phase": None if phase is None else str(phase),
            "pk2pc_name": name, "instance": instance}
