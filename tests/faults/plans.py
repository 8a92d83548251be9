"""The campaign's plans: each phase's operations and the faults armed in them.

Deterministic for a seed. An operation is ``{"op", "phase", "kind", "idem", "crash",
"kill_delay_us"[, "pause_seconds"]}``: ``kind`` is ``ok``, ``raise``, ``sql_error`` or
``oversize`` (``tests/faults/workload.py``); ``crash`` is a protocol point the client
kills itself at, or ``pause:<step>`` where it freezes itself. A pipeline phase's
"operations" are its input messages (``kind`` ``input``); its stages' arms are planned
by :func:`plan_arms`.
"""

from __future__ import annotations

import math
import random
from typing import Any

from .settings import KILL_KINDS, PAUSE_STEPS, PIPELINE_KINDS, POINTS, Settings

__all__ = ["ZOMBIE_STEPS", "arm_point", "make_plans", "min_inputs", "plan_arms"]

ZOMBIE_STEPS = ("before_prepare", "after_prepare", "before_commit", "after_commit",
                "before_pg_commit")
"""Where a pipeline stage freezes itself past its session timeout (``PAUSE_STEPS`` but
``init_producer``, which a stage seldom reaches)."""
SESSION_TIMEOUT_S = 6.0
"""The stages' ``session.timeout.ms`` (``tests.faults.stage.SESSION_TIMEOUT_MS``)."""


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
        if kind in PIPELINE_KINDS:  # input messages; the arms are planned in the phase
            n = max(n, min_inputs(s, kind))
            phases.append((kind, [{"op": f"p{idx:02d}.{i:05d}", "phase": kind, "kind": "input"}
                                  for i in range(n)]))
            continue
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
                arm_point(o, point, s, rng)
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
                arm_point(o, "after_commit" if rng.random() < 0.75 else "during_commit", s, rng)
        elif kind == "mixed":
            for o in ok:
                r = rng.random()
                if r < 0.12:
                    arm_point(o, rng.choice(POINTS), s, rng)
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


def arm_point(op: dict[str, Any], point: str, s: Settings, rng: random.Random) -> None:
    """Arm ``op`` with a kill at ``point`` (and, for the kills during a call, the delay)."""
    op["crash"] = point
    limit = {"during_commit": s.jitter_kafka_ms, "during_pg_commit": s.jitter_pg_ms}.get(point)
    if limit and rng.random() >= 0.2:  # a fifth: killed as the call is entered
        # Log-uniform from 20 us: the commit request leaves within about a millisecond,
        # so the start of the call is sampled as densely as its end.
        op["kill_delay_us"] = int(math.exp(rng.uniform(math.log(20.0), math.log(limit * 1000))))


# -- the pipeline workload ------------------------------------------------------------------


def _pipeline_jobs(s: Settings, kind: str, rng: random.Random) -> list[str]:
    """What a pipeline phase arms: ``pipeline``: ``ceil(--kills-per-point / 4)`` kills at
    each protocol step, ``--pauses-per-step // 4`` zombie pauses at each of
    ``ZOMBIE_STEPS`` (with fewer than 4, two zombie pauses at random steps) and one lost
    commit request and reply each; ``pipeline-mixed``: one kill per step, two zombie pauses
    and a lost commit reply."""
    if kind == "pipeline":
        kills = max(1, math.ceil(s.kills_per_point / 4))
        pauses = s.pauses_per_step // 4
        zombies = ([z for z in ZOMBIE_STEPS for _ in range(pauses)] if pauses
                   else rng.sample(ZOMBIE_STEPS, 2))
        return ([p for p in POINTS for _ in range(kills)]
                + [f"pause:{z}" for z in zombies]
                + ["lost-commit:request", "lost-commit:reply"])
    return [*POINTS, *(f"pause:{z}" for z in rng.sample(ZOMBIE_STEPS, 2)),
            "lost-commit:reply"]


def min_inputs(s: Settings, kind: str) -> int:
    """Input messages a pipeline phase needs so that its stages reach their arms: an arm
    fires 1-3 transactions after the previous one, and a batch holds one or a few."""
    return 6 * len(_pipeline_jobs(s, kind, random.Random(0)))


def plan_arms(s: Settings, kind: str, idx: int, rng: random.Random
              ) -> dict[str, list[dict[str, Any]]]:
    """instance -> its arms, in order (``tests/faults/stage.py``), dealt round-robin, the
    lost commits first. A zombie pause lasts 1.5-4 s more than the session timeout."""
    jobs = _pipeline_jobs(s, kind, rng)
    rng.shuffle(jobs)
    # The lost commits first: a stage's later arms may find the input consumed already.
    jobs.sort(key=lambda j: not j.startswith("lost-commit:"))
    out: dict[str, list[dict[str, Any]]] = {f"stage{i}": [] for i in range(s.stages)}
    for j, crash in enumerate(jobs):
        instance = f"stage{j % s.stages}"
        arm: dict[str, Any] = {"arm": f"a{idx:02d}.{instance}.{len(out[instance])}",
                               "after": rng.randint(1, 3), "kill_delay_us": 0}
        if crash.startswith("lost-commit:"):
            arm["crash"] = crash
        elif crash.startswith("pause:"):
            arm["crash"] = crash
            arm["pause_seconds"] = round(rng.uniform(SESSION_TIMEOUT_S + 1.5,
                                                     SESSION_TIMEOUT_S + 4.0), 3)
        else:
            arm_point(arm, crash, s, rng)
        out[instance].append(arm)
    return out
