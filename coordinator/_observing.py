"""Fan-out to the configured observers (``observe.py``), shielding the protocol
from them: an observer that raises is logged and ignored."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from ._enums import Phase, Status
from ._logging import log_extra
from .observe import Headers, Observer, TransactionInfo, TransactionObserver

__all__ = ["Observers", "TxObservers"]

log = logging.getLogger("coordinator")


def _quietly(what: str, call: Callable[[], Any], fields: dict[str, object]) -> Any:
    try:
        return call()
    except Exception:
        log.exception("observer failed in %s (ignored)", what, extra=fields)
        return None


class TxObservers:
    """The observers of one transaction, with its phase clock."""

    __slots__ = ("_each", "_ended", "_fields", "_headers", "_phase_start", "_start")

    def __init__(self, each: Sequence[TransactionObserver], name: str | None = None,
                 instance: str | None = None) -> None:
        self._each = tuple(each)
        self._fields = log_extra(name=name, instance=instance)
        self._start = self._phase_start = time.perf_counter()
        self._ended = False
        self._headers: tuple[tuple[str, bytes], ...] | None = None

    def headers(self) -> tuple[tuple[str, bytes], ...]:
        if self._headers is None:
            found: list[tuple[str, bytes]] = []
            for o in self._each:
                found.extend(_quietly("headers", o.headers, self._fields) or ())
            self._headers = tuple(found)
        return self._headers

    def phase_start(self) -> None:
        self._phase_start = time.perf_counter()

    def phase(self, phase: Phase) -> None:
        """``phase`` ended now (it began at the last :meth:`phase_start`)."""
        seconds = time.perf_counter() - self._phase_start
        for o in self._each:
            _quietly("phase", lambda o=o: o.phase(phase, seconds),  # type: ignore[misc]
                     {**self._fields, "phase": None if phase is None else str(phase)})
        self._phase_start = time.perf_counter()

    def prepared(self, gid: str) -> None:
        self._fields = {**self._fields, "gid": gid}
        for o in self._each:
            _quietly("prepared", lambda o=o: o.prepared(gid), self._fields)  # type: ignore[misc]

    def group(self, members: int) -> None:
        for o in self._each:
            _quietly("group", lambda o=o: o.group(members), self._fields)  # type: ignore[misc]

    def end(self, status: Status, phase: Phase | None, error: BaseException | None) -> None:
        if self._ended:
            return
        self._ended = True
        seconds = time.perf_counter() - self._start
        for o in self._each:
            _quietly("end", lambda o=o: o.end(status, phase, error, seconds),  # type: ignore[misc]
                     {**self._fields, "phase": None if phase is None else str(phase)})


class Observers:
    """All observers of a coordinator."""

    def __init__(self, observers: Sequence[Observer], name: str, instance: str) -> None:
        self._each = tuple(observers)
        self.name = name
        self.instance = instance
        self._fields = log_extra(name=name, instance=instance)

    def transaction(self, txid: str, idempotency_key: str | None,
                    consumed_headers: Sequence[Headers] = ()) -> TxObservers:
        if not self._each:
            return TxObservers(())
        info = TransactionInfo(self.name, self.instance, txid, idempotency_key,
                               tuple(consumed_headers))
        made = [_quietly("transaction", lambda o=o: o.transaction(info),  # type: ignore[misc]
                         self._fields) for o in self._each]
        return TxObservers([m for m in made if m is not None], self.name, self.instance)

    def producer_started(self, slot: int, generation: int) -> None:
        for o in self._each:
            _quietly("producer_started", lambda o=o: o.producer_started(  # type: ignore[misc]
                self.name, self.instance, slot, generation), self._fields)

    def idempotency_hit(self) -> None:
        for o in self._each:
            _quietly("idempotency_hit",
                     lambda o=o: o.idempotency_hit(self.name, self.instance),  # type: ignore[misc]
                     self._fields)
