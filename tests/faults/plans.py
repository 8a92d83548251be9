"""The campaign's plans: each phase's operations and the faults armed in them.

Deterministic for a seed. An operation is ``{"op", "phase", "kind", "idem", "crash",
"kill_delay_us"[, "pause_seconds"]}``: ``kind`` is ``ok``, ``raise``, ``sql_error`` or
``oversize`` (``tests/faults/workload.py``); ``crash`` is a protocol point the client
kills itself at, or ``pause:<step>`` where it freezes itself.
"""

from __future__ import annotations

import math
import random
from typing import Any

from .settings import KILL_KINDS, PAUSE_STEPS, POINTS, Settings

__all__ = ["make_plans"]


def make_plans(s: Settings, rng: random.Random) -> list[tuple[str, list[dict[str, Any]]]]:
    """[(phase kind, its operations)], deterministic for a seed."""
    kinds = s.faults
    share = max(1, s.ops // len(kinds))
    extra = s.ops - share * len(kinds)
    phases: list[tuple[str, list[dict[str, Any]]]] = []
    stride = s.workers * s.threads
    """ops[j] and ops[j - stride] go to the same worker process and thread, in a row."""
    for idx, kind in enumerate(kinds):
        n = share + (1 if idx < extra else 0)
        if kind in KILL_KINDS:
            n = max(n, math.ceil(s.kills_per_point / 0.8) + s.workers)
        elif kind == "pause":
            armed = s.pauses_per_step * len(PAUSE_STEPS)
            n = max(n, math.ceil(armed * 1.6 / 0.75) + 3 * stride)
        elif kind in ("operator-mistake", "clock-skew"):
            n = max(n, math.ceil(s.kills_per_point / 0.12 / 0.8) + s.workers)
        ops: list[dict[str, Any]] = []
        for i in range(n):
            r = rng.random()
            op_kind = ("raise" if r < 0.08 else "sql_error" if r < 0.12
                       else "oversize" if r < 0.12 + s.oversize_rate else "ok")
            ops.append({"op": f"p{idx:02d}.{i:05d}", "phase": kind, "kind": op_kind,
                        "idem": rng.random() < 0.5, "crash": None, "kill_delay_us": 0})
        ok = [o for o in ops if o["kind"] == "ok"]
        if kind in KILL_KINDS:
            point = kind.split(":", 1)[1]
            for o in rng.sample(ok, min(s.kills_per_point, len(ok))):
                _arm(o, point, s, rng)
        elif kind == "pause":
            _arm_pauses(ops, s, rng, stride)
        elif kind in ("operator-mistake", "clock-skew"):
            # Kills after the Kafka commit (and during it): in-doubt transactions whose
            # decision is in the log, for recovery to find (clock-skew: by the skewed
            # workers w0 and w1).
            pool = ok if kind == "operator-mistake" else [
                o for j, o in enumerate(ops) if o["kind"] == "ok" and j % s.workers < 2]
            for o in rng.sample(pool, min(len(pool), max(s.kills_per_point,
                                                         len(pool) // 6))):
                _arm(o, "after_commit" if rng.random() < 0.75 else "during_commit", s, rng)
        elif kind == "mixed":
            for o in ok:
                r = rng.random()
                if r < 0.12:
                    _arm(o, rng.choice(POINTS), s, rng)
                elif r < 0.18:
                    o["crash"] = f"pause:{rng.choice(PAUSE_STEPS)}"
                    o["pause_seconds"] = round(rng.uniform(s.pause_seconds,
                                                           1.5 * s.pause_seconds), 3)
        phases.append((kind, ops))
    return phases


def _arm_pauses(ops: list[dict[str, Any]], s: Settings, rng: random.Random,
                stride: int) -> None:
    """``--pauses-per-step`` pauses at each step. Every pause at ``init_producer`` and every
    other one at ``after_prepare`` follows ``oversize`` operations on the same worker and
    thread -- as many as the coordinator has producers -- so that the paused operation
    finds its slot's producer dropped and creates it again: at ``init_producer`` the pause
    lands in that ``init_transactions()``, at ``after_prepare`` before it."""
    producers = 1 if s.group_commit else 2
    reserved: set[int] = set()
    jobs = [(step, i) for step in PAUSE_STEPS for i in range(s.pauses_per_step)]
    rng.shuffle(jobs)
    for step, i in jobs:
        prefixed = step == "init_producer" or (step == "after_prepare" and i % 2 == 0)

        def fits(j: int, prefixed: bool = prefixed) -> bool:
            if ops[j]["kind"] != "ok" or j in reserved:
                return False
            if not prefixed:
                return True
            before = [j - k * stride for k in range(1, producers + 1)]
            return all(b >= 0 and b not in reserved for b in before)

        candidates = [j for j in range(len(ops)) if fits(j)]
        if not candidates:
            break
        j = rng.choice(candidates)
        reserved.add(j)
        ops[j]["crash"] = f"pause:{step}"
        ops[j]["pause_seconds"] = round(rng.uniform(s.pause_seconds, 1.5 * s.pause_seconds), 3)
        if prefixed:
            for k in range(1, producers + 1):
                ops[j - k * stride]["kind"] = "oversize"
                reserved.add(j - k * stride)


def _arm(op: dict[str, Any], point: str, s: Settings, rng: random.Random) -> None:
    op["crash"] = point
    limit = {"during_commit": s.jitter_kafka_ms, "during_pg_commit": s.jitter_pg_ms}.get(point)
    if limit and rng.random() >= 0.2:  # a fifth: killed as the call is entered
        # Log-uniform from 20 us: the commit request leaves within about a millisecond,
        # so the start of the call is sampled as densely as its end.
        op["kill_delay_us"] = int(math.exp(rng.uniform(math.log(20.0), math.log(limit * 1000))))
