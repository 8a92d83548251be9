"""Benchmark: one recovery run over 10,000 in-doubt transactions (target <= 30 s).

    KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:39092 .venv/bin/python -m tests.bench.recovery

(from the repository root).

What it does:

1. starts its own PostgreSQL cluster in ``.stack/bench-recovery/`` (git-ignored; in
   ``/tmp/pk2pc-bench-recovery`` when the postgres OS user cannot reach it): initdb each
   run, ``max_prepared_transactions=12000``, ``max_connections=100``, a free port, run as
   the ``postgres`` OS user when started as root; stopped at the end with ``pg_ctl stop``
   (``--keep-cluster`` leaves it running);
2. makes ``--count`` in-doubt transactions the way a crashing coordinator leaves them:
   several coordinators (``--instances`` x ``--producers`` transactional ids) run
   transactions from ``--threads`` threads; each inserts a row and produces a message,
   PREPAREs, and then "crashes" at the Kafka commit (``tests/crash/indoubt.py``'s
   ``on_step`` hook raises a BaseException): half of them
   before the Kafka transaction (no decision record: recovery must roll back), half after
   it committed (the decision record is in the log: recovery must commit);
3. times ONE recovery run: the CLI as a subprocess (``python -m recovery --grace-seconds 0
   --json``), and, on a second batch of ``--count``, ``recovery.recover()`` in-process
   (``--mode`` picks either or both);
4. verifies every gid was resolved correctly: the committed half has its rows and its
   messages visible to a read_committed consumer, the other half neither, nothing stays
   prepared, the report lists exactly the expected gids;
5. prints one line per mode and a summary line; exit 0 when correct and within
   ``--target`` seconds, 1 otherwise.

``--profile`` runs the in-process recovery under cProfile and prints where the time goes.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

import recovery
from coordinator import Coordinator, CoordinatorConfig, DecisionTopic
from coordinator.gid import GID_PREFIX
from tests.bench.pgcluster import Cluster, bin_dir, free_port
from tests.crash import indoubt
from tests.plugins.kafka_helpers import create_topic, delete_topics, read_committed

ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = ROOT / ".stack" / "bench-recovery"
TABLE = "bench_ops"


def say(msg: str) -> None:
    print(f"[bench_recovery] {msg}", file=sys.stderr, flush=True)


# -- making in-doubt transactions ----------------------------------------------------------------


@dataclass
class Batch:
    name: str
    ops: dict[str, str] = field(default_factory=dict)
    """op id -> gid"""
    commit: set[str] = field(default_factory=set)
    """op ids whose decision record was committed"""
    seconds: float = 0.0


def make_batch(dsn: str, kafka: dict[str, Any], label: str, count: int, instances: int,
               producers: int, threads: int, decision_topic: DecisionTopic,
               topic: str) -> Batch:
    batch = Batch(name=f"bench{uuid.uuid4().hex[:8]}")
    coords = [
        Coordinator(dsn, kafka, batch.name, instance=f"b{i}", config=CoordinatorConfig(
            decision_topic=decision_topic, producers=producers,
            pool_min_size=1, pool_max_size=producers + 2, startup_timeout=60.0,
            on_step=indoubt.on_step))
        for i in range(instances)
    ]
    insert = sql.SQL("INSERT INTO {} (op_id) VALUES (%s)").format(sql.Identifier(TABLE))
    lock = threading.Lock()
    started = time.monotonic()
    try:
        for c in coords:
            c.open()

        def one(k: int) -> None:
            op = f"{label}-{k}"
            # Every instance gets both kinds: op k goes to instance k % n, and the kind
            # alternates per round of n ops.
            coord = coords[k % len(coords)]
            mode = "after_commit" if (k // len(coords)) % 2 else "before_commit"
            value = json.dumps({"op": op, "n": 0}).encode()
            gid = indoubt.make_in_doubt(coord, mode, insert, (op,),
                                        [(topic, op.encode(), value)])
            with lock:
                batch.ops[op] = gid
                if mode == "after_commit":
                    batch.commit.add(op)

        with ThreadPoolExecutor(max_workers=threads) as ex:
            for f in [ex.submit(one, k) for k in range(count)]:
                f.result()
    finally:
        for c in coords:
            c.close()
    batch.seconds = time.monotonic() - started
    return batch


# -- verification ----------------------------------------------------------------------------


def verify(dsn: str, bootstrap: str, topic: str, batch: Batch, label: str,
           report: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    want_commit = {batch.ops[o] for o in batch.commit}
    want_rollback = set(batch.ops.values()) - want_commit
    if set(report["committed"]) != want_commit:
        problems.append(f"committed: {len(report['committed'])} gids, expected "
                        f"{len(want_commit)} ({len(set(report['committed']) ^ want_commit)} "
                        "differ)")
    if set(report["rolled_back"]) != want_rollback:
        problems.append(f"rolled back: {len(report['rolled_back'])} gids, expected "
                        f"{len(want_rollback)}")
    if report["remaining"]:
        problems.append(f"{len(report['remaining'])} remaining, e.g. "
                        f"{report.get('remaining_reasons', {})}"[:300])
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = {str(r[0]) for r in conn.execute(
            sql.SQL("SELECT op_id FROM {} WHERE op_id LIKE %s").format(sql.Identifier(TABLE)),
            (f"{label}-%",)).fetchall()}
        prepared = conn.execute("SELECT count(*) FROM pg_prepared_xacts WHERE gid LIKE %s",
                                (f"{GID_PREFIX}:{batch.name}:%",)).fetchone()
    if rows != batch.commit:
        problems.append(f"PostgreSQL rows: {len(rows)}, expected {len(batch.commit)} "
                        f"({len(rows - batch.commit)} unexpected, {len(batch.commit - rows)} "
                        "missing)")
    if prepared is None or prepared[0] != 0:
        problems.append(f"{prepared and prepared[0]} prepared transactions remain")
    visible: dict[str, int] = {}
    for rec in read_committed(bootstrap, topic, timeout=120):
        op = json.loads(rec.value or b"{}").get("op", "")
        if op.startswith(f"{label}-"):
            visible[op] = visible.get(op, 0) + 1
    if set(visible) != batch.commit:
        problems.append(f"visible messages for {len(visible)} ops, expected "
                        f"{len(batch.commit)}")
    if any(n != 1 for n in visible.values()):
        problems.append("some message is visible more than once")
    return problems


# -- the runs -----------------------------------------------------------------------------------


def run_cli(dsn: str, bootstrap: str, batch: Batch, decision_topic: str,
            log_path: Path) -> tuple[float, int, dict[str, Any]]:
    cmd = [sys.executable, "-m", "recovery", "--postgres", dsn, "--bootstrap-servers",
           bootstrap, "--name", batch.name, "--decision-topic", decision_topic,
           "--grace-seconds", "0", "--json"]
    with open(log_path, "w", encoding="utf-8") as err:
        started = time.monotonic()
        done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True,
                              check=False)
        seconds = time.monotonic() - started
    try:
        report = json.loads(done.stdout)
    except ValueError:
        raise SystemExit(f"recovery printed no JSON (exit {done.returncode}); see "
                         f"{log_path}") from None
    return seconds, done.returncode, report


def run_in_process(dsn: str, bootstrap: str, batch: Batch, decision_topic: str,
                   profile: bool) -> tuple[float, int, dict[str, Any], str]:
    cfg = recovery.RecoveryConfig(decision_topic=decision_topic, grace_seconds=0)
    prof = cProfile.Profile() if profile else None
    started = time.monotonic()
    if prof is not None:
        prof.enable()
    rep = recovery.recover(dsn, {"bootstrap.servers": bootstrap}, batch.name, cfg)
    if prof is not None:
        prof.disable()
    seconds = time.monotonic() - started
    text = ""
    if prof is not None:
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out)
        stats.sort_stats("cumulative").print_stats(25)
        text = out.getvalue()
    return seconds, rep.exit_code, rep.as_json(), text


@contextlib.contextmanager
def quiet_coordinator_logs() -> Iterator[None]:
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # The simulated crashes are expected; only real errors are worth showing.
    logging.getLogger("coordinator").setLevel(logging.ERROR)
    yield


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.recovery",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=10_000)
    p.add_argument("--instances", type=int, default=4)
    p.add_argument("--producers", type=int, default=4, help="per instance")
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--mode", choices=["cli", "inprocess", "both"], default="both")
    p.add_argument("--target", type=float, default=30.0, help="seconds")
    p.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS"),
                   help="default: $KAFKA_BOOTSTRAP_SERVERS")
    p.add_argument("--pg-bin", help="PostgreSQL bin directory (default: newest installed)")
    p.add_argument("--port", type=int, default=0, help="default: a free port")
    p.add_argument("--keep-cluster", action="store_true")
    p.add_argument("--profile", action="store_true",
                   help="profile the in-process run with cProfile")
    args = p.parse_args()
    if not args.bootstrap:
        raise SystemExit("set KAFKA_BOOTSTRAP_SERVERS (or --bootstrap)")
    if args.count > 11_000:
        raise SystemExit("--count above 11000 needs a larger max_prepared_transactions")

    cluster = Cluster(bin_dir(args.pg_bin), BENCH_DIR, args.port or free_port())
    if not cluster.reachable():  # e.g. a checkout under /root: the postgres user is locked out
        cluster = Cluster(cluster.bin, Path("/tmp/pk2pc-bench-recovery"), cluster.port)
    kafka = {"bootstrap.servers": args.bootstrap}
    suffix = uuid.uuid4().hex[:8]
    topic = f"pk2pc-bench-recovery-{suffix}"
    decision_topic = DecisionTopic(name=f"pk2pc.bench-recovery-decisions.{suffix}")
    modes = ["cli", "inprocess"] if args.mode == "both" else [args.mode]
    results: list[str] = []
    ok = True
    with quiet_coordinator_logs():
        try:
            say(f"starting PostgreSQL in {cluster.data} on port {cluster.port}")
            cluster.start()
            with psycopg.connect(cluster.dsn, autocommit=True) as conn:
                conn.execute(sql.SQL("CREATE TABLE {} (op_id text PRIMARY KEY)").format(
                    sql.Identifier(TABLE)))
            create_topic(args.bootstrap, topic, partitions=6)
            for mode in modes:
                label = f"{mode}{suffix}"
                say(f"{mode}: creating {args.count} in-doubt transactions "
                    f"({args.instances} instances x {args.producers} producers, "
                    f"{args.threads} threads)")
                batch = make_batch(cluster.dsn, kafka, label, args.count, args.instances,
                                   args.producers, args.threads, decision_topic, topic)
                say(f"{mode}: created in {batch.seconds:.1f} s "
                    f"({len(batch.commit)} with a decision record)")
                if mode == "cli":
                    seconds, rc, report = run_cli(cluster.dsn, args.bootstrap, batch,
                                                  decision_topic.name,
                                                  BENCH_DIR / "recovery-cli.log")
                    profile = ""
                else:
                    seconds, rc, report, profile = run_in_process(
                        cluster.dsn, args.bootstrap, batch, decision_topic.name,
                        args.profile)
                problems = verify(cluster.dsn, args.bootstrap, topic, batch, label,
                                  report)
                if rc != 0:
                    problems.append(f"exit code {rc}")
                good = not problems and seconds <= args.target
                ok = ok and good
                verdict = "correct" if not problems else "WRONG: " + "; ".join(problems)
                line = (f"{mode}: {len(batch.ops)} in-doubt ({len(report['committed'])} "
                        f"committed, {len(report['rolled_back'])} rolled back, "
                        f"{len(report.get('fenced_transactional_ids', []))} "
                        f"transactional.ids fenced) resolved in {seconds:.2f} s, exit "
                        f"{rc}, {verdict}")
                results.append(line)
                print(f"bench_recovery {line}", flush=True)
                if profile:
                    print(profile, file=sys.stderr)
        finally:
            delete_topics(args.bootstrap, [topic, decision_topic.name])
            if args.keep_cluster:
                say(f"cluster left running: {cluster.dsn} (data {cluster.data})")
            else:
                cluster.stop()
    print(f"bench_recovery: {'PASS' if ok else 'FAIL'} (target <= {args.target:g} s); "
          + " | ".join(results), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
