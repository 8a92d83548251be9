"""Fan-out to the configured observers (``observe.py``), shielding the protocol
from them: an observer that raises is logged and ignored."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from ._enums import Phase, Status
from .observe import Headers, Observer, TransactionInfo, TransactionObserver

__all__ = ["Observers", "TxObservers"]

log = logging.getLogger("coordinator")


def _quietly(what: str, call: Callable[[], Any]) -> Any:
    try:
        return call()
    except Exception:
        log.exception("observer failed in %s (ignored)", what)
        return None


class TxObservers:
    """The observers of one transaction, with its phase clock."""

    __slots__ = ("_each", "_ended", "_headers", "_phase_start", "_start")

    def __init__(self, each: Sequence[TransactionObserver]) -> None:
        self._each = tuple(each)
        self._start = self._phase_start = time.perf_counter()
        self._ended = False
        self._headers: tuple[tuple[str, bytes], ...] | None = None

    def headers(self) -> tuple[tuple[str, bytes], ...]:
        if self._headers is None:
            found: list[tuple[str, bytes]] = []
            for o in self._each:
                found.extend(_quietly("headers", o.headers) or ())
            self._headers = tuple(found)
        return self._headers

    def phase_start(self) -> None:
        self._phase_start = time.perf_counter()

    def phase(self, phase: Phase) -> None:
        """``phase`` ended now (it began at the last :meth:`phase_start`)."""
        seconds = time.perf_counter() - self._phase_start
        for o in self._each:
            _quietly("phase", lambda o=o: o.phase(phase, seconds))  # type: ignore[misc]
        self._phase_start = time.perf_counter()

    def prepared(self, gid: str) -> None:
        for o in self._each:
            _quietly("prepared", lambda o=o: o.prepared(gid))  # type: ignore[misc]

    def group(self, members: int) -> None:
        for o in self._each:
            _quietly("group", lambda o=o: o.group(members))  # type: ignore[misc]

    def end(self, status: Status, phase: Phase | None, error: BaseException | None) -> None:
        if self._ended:
            return
        self._ended = True
        seconds = time.perf_counter() - self._start
        for o in self._each:
            _quietly("end", lambda o=o: o.end(status, phase, error, seconds))  # type: ignore[misc]


class Observers:
    """All observers of a coordinator."""

    def __init__(self, observers: Sequence[Observer], name: str, instance: str) -> None:
        self._each = tuple(observers)
        self.name = name
        self.instance = instance

    def transaction(self, txid: str, idempotency_key: str | None,
                    consumed_headers: Sequence[Headers] = ()) -> TxObservers:
        if not self._each:
            return TxObservers(())
        info = TransactionInfo(self.name, self.instance, txid, idempotency_key,
                               tuple(consumed_headers))
        made = [_quietly("transaction", lambda o=o: o.transaction(info))  # type: ignore[misc]
                for o in self._each]
        return TxObservers([m for m in made if m is not None])

    def producer_started(self, slot: int, generation: int) -> None:
        for o in self._each:
            _quietly("producer_started", lambda o=o: o.producer_started(  # type: ignore[misc]
                self.name, self.instance, slot, generation))

    def idempotency_hit(self) -> None:
        for o in self._each:
            _quietly("idempotency_hit",
                     lambda o=o: o.idempotency_hit(self.name, self.instance))  # type: ignore[misc]
