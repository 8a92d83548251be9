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
    """The observers of one transaction, with its phase clock.

    Called several times per transaction on the hot path: plain loops, and log
    fields built only when an observer fails."""

    __slots__ = ("_each", "_ended", "_gid", "_headers", "_instance", "_name",
                 "_phase_start", "_start")

    def __init__(self, each: Sequence[TransactionObserver], name: str | None = None,
                 instance: str | None = None) -> None:
        self._each = tuple(each)
        self._name = name
        self._instance = instance
        self._gid: str | None = None
        self._start = self._phase_start = time.perf_counter()
        self._ended = False
        self._headers: tuple[tuple[str, bytes], ...] | None = None

    def _failed(self, what: str, phase: Phase | None = None) -> None:
        log.exception("observer failed in %s (ignored)", what, extra=log_extra(
            gid=self._gid, phase=phase, name=self._name, instance=self._instance))

    def headers(self) -> tuple[tuple[str, bytes], ...]:
        if self._headers is None:
            found: list[tuple[str, bytes]] = []
            for o in self._each:
                try:
                    found.extend(o.headers() or ())
                except Exception:
                    self._failed("headers")
            self._headers = tuple(found)
        return self._headers

    def phase_start(self) -> None:
        self._phase_start = time.perf_counter()

    def phase(self, phase: Phase) -> None:
        """``phase`` ended now (it began at the last :meth:`phase_start`)."""
        now = time.perf_counter()
        seconds = now - self._phase_start
        for o in self._each:
            try:
                o.phase(phase, seconds)
            except Exception:
                self._failed("phase", phase)
        self._phase_start = now

    def prepared(self, gid: str) -> None:
        self._gid = gid
        for o in self._each:
            try:
                o.prepared(gid)
            except Exception:
                self._failed("prepared")

    def group(self, members: int) -> None:
        for o in self._each:
            try:
                o.group(members)
            except Exception:
                self._failed("group")

    def end(self, status: Status, phase: Phase | None, error: BaseException | None) -> None:
        if self._ended:
            return
        self._ended = True
        seconds = time.perf_counter() - self._start
        for o in self._each:
            try:
                o.end(status, phase, error, seconds)
            except Exception:
                self._failed("end", phase)


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
