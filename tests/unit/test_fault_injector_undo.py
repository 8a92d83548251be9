"""The fault campaign's own harness: undoing a network fault survives a Toxiproxy that
answers late (a toxic's removal waits while a client of the proxy is SIGSTOPped)."""

from __future__ import annotations

import random
import threading

from tests.faults.injectors import Injector
from tests.faults.toxiproxy import Toxiproxy, ToxiproxyError


class SlowToxiproxy(Toxiproxy):
    """Every call times out ``fail`` times before it works; remembers the state."""

    def __init__(self, fail: int) -> None:
        super().__init__("http://127.0.0.1:9")
        self.fail = fail
        self.toxics = {("kafka-1", "slow1"), ("kafka-1", "slow2"), ("postgres", "cut3")}
        self.disabled = {"postgres"}
        self.resets = 0

    def _flaky(self) -> None:
        if self.fail:
            self.fail -= 1
            raise ToxiproxyError("DELETE /proxies/kafka-1/toxics/slow1: timed out")

    def remove_toxic(self, proxy: str, name: str) -> None:
        self._flaky()
        self.toxics.discard((proxy, name))

    def set_enabled(self, proxy: str, enabled: bool) -> None:
        self._flaky()
        if enabled:
            self.disabled.discard(proxy)

    def reset(self) -> None:
        self._flaky()
        self.resets += 1
        self.toxics.clear()
        self.disabled.clear()


class Lab:
    brokers = 1
    storm_grace = 1.0

    def __init__(self, toxiproxy: Toxiproxy) -> None:
        self.toxiproxy = toxiproxy
        self.events: list[tuple[str, dict[str, object]]] = []

    def event(self, fault: str, **detail: object) -> None:
        self.events.append((fault, detail))

    def alive_workers(self, ready_only: bool = True) -> list[tuple[str, int]]:
        return []

    def in_attempt(self, instance: str) -> bool:
        return False

    def kill_worker(self, instance: str, pid: int) -> bool:
        return False

    def pause_worker(self, instance: str, pid: int, seconds: float) -> bool:
        return False

    def kill_broker_now(self, broker: int) -> None:
        pass

    def stop_postgres_now(self) -> None:
        pass


def _injector(tp: SlowToxiproxy, undo_seconds: float) -> tuple[Injector, Lab, list[float]]:
    lab = Lab(tp)
    slept: list[float] = []
    injector = Injector(lab, random.Random(1), threading.Event(), undo_seconds=undo_seconds,
                        sleep=slept.append)
    return injector, lab, slept


def test_undo_retries_each_call_until_toxiproxy_answers() -> None:
    tp = SlowToxiproxy(fail=3)
    injector, lab, slept = _injector(tp, undo_seconds=60.0)
    injector.undo(sorted(tp.toxics), ["postgres"])
    assert tp.toxics == set()
    assert tp.disabled == set()
    assert tp.resets == 0
    assert slept == [1.0, 1.0, 1.0]
    assert lab.events == [("undo-retried", {"calls": 3, "counts": False})]


def test_undo_resets_toxiproxy_when_a_call_keeps_failing() -> None:
    tp = SlowToxiproxy(fail=1)
    injector, lab, _ = _injector(tp, undo_seconds=-1.0)  # the deadline has passed at once
    injector.undo(sorted(tp.toxics), ["postgres"])
    assert tp.toxics == set()
    assert tp.disabled == set()
    assert tp.resets == 1
    assert [fault for fault, _ in lab.events] == ["undo-failed"]
