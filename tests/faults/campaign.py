"""The crash-and-fault campaign: ``scripts/faults`` (``python -m tests.faults``).

1. Starts (or reuses) the campaign's own stack instance -- ``scripts/stack up --toxiproxy``
   with ``STACK_DIR=.stack/faults`` and every port moved by ``--port-offset`` -- so that
   killing brokers and stopping PostgreSQL never disturbs the shared development stack.
   A fresh database, business topic and decision topic per run.
2. Runs one *phase* per fault kind (``--faults``): ``--workers`` client processes
   (``tests/faults/workload.py``, instances ``w0``, ``w1``...) share the phase's operations; the
   phase's fault is injected while they run; a process that dies is started again with the
   same instance id (as an orchestrator would), and carries on with its log. Coordinators
   reach PostgreSQL and Kafka through Toxiproxy; recovery and the checker connect directly.
   ``--driver async``: the clients run their operations through an ``AsyncCoordinator``
   (``--threads`` asyncio tasks per process; ``tests/faults/aworkload.py``), with the same
   plan, hooks, log and checker; the pipeline stages run ``AsyncCoordinator.run_consumer``.
3. Meanwhile the recovery command runs every few seconds (``python -m recovery ... --json``,
   like a CronJob), and even-numbered workers call ``recovery.recover_own`` at start-up.
4. After the last phase: every fault healed, recovery runs until it exits 0 with nothing
   left in its grace period, then the checker (``tests/faults/check.py``) compares PostgreSQL,
   the ``read_committed`` view of Kafka, the decision log and what every client was told.
5. Prints a table per fault kind and the line ``ops=N divergences=N duplicates=N
   leftovers=N lost=N``; exit status 1 when anything but ``ops`` is non-zero, when an
   attempt raised something else than the coordinator's errors, or when the
   second-opinion checker of ``tests/crash/checker.py`` found a problem; 2 when the
   campaign itself could not run or did not complete (a phase timed out).

The pipeline phases (``pipeline``, ``pipeline-mixed``; ``tests/faults/pipeline.py``) run
``--stages`` consumer stage processes instead of the clients: the campaign feeds an input
topic, the stages consume it in one group with ``Coordinator.run_consumer`` (one row and
one output message per input message), killed at the protocol steps and at random, frozen
past their session timeout (zombies) and given lost commits; ``pipeline-mixed`` adds the
mixed phase's faults and the recovery storm. Their checker
(``tests/faults/pipecheck.py``) adds its rows and problems to the same tables and final line.

Fault kinds that attack atomicity through recovery (docs/reliability.md):

* ``pause`` -- workers freeze themselves (SIGSTOP, a detached waker sends SIGCONT after
  ``--pause-seconds``) at each of the steps ``tests.crash.worker.PAUSE_STEPS``,
  ``--pauses-per-step`` times each (an ``oversize`` operation right before a pause at
  ``init_producer`` and half of those at ``after_prepare``, so that the slot's producer is
  re-created in the paused operation), and the campaign SIGSTOPs random workers at random
  moments inside attempts for 0.4 s .. storm grace + 3 s; a recovery storm runs throughout.
* ``recovery-storm`` -- the recovery command with ``--grace-seconds`` =
  ``--storm-grace-seconds`` (0) back to back against the live coordinators.
* ``slow-kafka`` -- a storm, and Toxiproxy latency above the storm's grace period on the
  coordinators' broker connections.
* ``operator-mistake`` -- between the normal recovery runs, recovery with grace 0 pointed
  at a wrong decision topic (existing, empty) and at a second Kafka cluster (a second stack
  instance, ``--second-stack-dir``, ``--second-port-offset``), while workers are killed
  after their Kafka commit.
* ``clock-skew`` -- worker w0 runs under libfaketime with its clock ``--skew-seconds``
  behind, w1 ahead (``tests/faults/faketime_fix.c`` keeps librdkafka and Python's sleeps working
  under it), and workers are killed after their Kafka commit, so recovery must find
  decisions written with skewed timestamps.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import random
import shlex
import signal
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

from tests.plugins.kafka_helpers import create_topic

from .check import load_logs, run_check
from .pipecheck import check_pipeline, describe, fold
from .pipeline import Pipeline, is_stage_gid
from .plans import make_plans
from .recoveries import Recoveries
from .report import Journal, say, write_summary
from .settings import (
    EXIT_ERROR,
    EXIT_FAILED,
    GROUPS,
    KINDS,
    NAME,
    OVERSIZE_LIMIT,
    PIPELINE_KINDS,
    ROOT,
    CampaignError,
    Settings,
    parse_faults,
)
from .stack import (
    heal,
    prepare_data,
    setup_clock_skew,
    start_second_stack,
    start_stack,
    stop_second_stack,
    stop_stack,
)
from .supervise import Campaign

__all__ = ["main", "run"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts/faults", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", type=int, default=300, help="operations in all (default 300)")
    p.add_argument("--faults", type=parse_faults, default=list(KINDS),
                   help="comma-separated fault kinds or groups (default all): "
                   f"{', '.join(KINDS)}; groups: {', '.join(GROUPS)}")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random; "
                   "printed, so that a run can be replayed)")
    p.add_argument("--workers", type=int, default=3, help="client processes (default 3)")
    p.add_argument("--stages", type=int, default=3,
                   help="pipeline phases: consumer stage processes in the group (default 3)")
    p.add_argument("--brokers", type=int, choices=(1, 3), default=1,
                   help="Kafka brokers of the campaign's stack (3: RF 3, min.insync.replicas "
                   "2; kafka-restart then kills one broker during commits)")
    p.add_argument("--kills-per-point", type=int, default=10,
                   help="kill -9 at each protocol step (one phase per step; default 10)")
    p.add_argument("--phase-seconds", type=float, default=30.0,
                   help="target duration of each service/network/random-kill phase")
    p.add_argument("--grace-seconds", type=float, default=15.0,
                   help="recovery's grace period (> transaction.timeout.ms = 10 s)")
    p.add_argument("--recovery-interval", type=float, default=5.0,
                   help="seconds between runs of the recovery command during the phases")
    p.add_argument("--group-commit", action="store_true",
                   help="coordinators with group commit (GroupCommit()): concurrent "
                   "transactions of a client process share Kafka transactions")
    p.add_argument("--threads", type=int, default=None,
                   help="client threads per process, sharing its coordinator (default 1; "
                   "4 with --group-commit)")
    p.add_argument("--driver", choices=("sync", "async"), default="sync",
                   help="the clients' coordinator: sync (Coordinator; --threads threads, "
                   "the default) or async (AsyncCoordinator; --threads asyncio tasks on one "
                   "event loop); the pipeline stages likewise run Coordinator.run_consumer or "
                   "AsyncCoordinator.run_consumer")
    p.add_argument("--messages-per-op", type=int, default=2)
    p.add_argument("--jitter-kafka-ms", type=float, default=12.0,
                   help="kill:during_commit kills up to this long after commit_transaction() "
                   "was entered (log-uniform from 20 us; a fifth at once)")
    p.add_argument("--jitter-pg-ms", type=float, default=4.0,
                   help="kill:during_pg_commit kills up to this long after COMMIT PREPARED "
                   "was entered (likewise)")
    p.add_argument("--pauses-per-step", type=int, default=5,
                   help="pause phase: SIGSTOP a worker at each of the steps before_prepare, "
                   "after_prepare, init_producer, before_commit, after_commit, "
                   "before_pg_commit this many times (default 5; 20+ in a full run)")
    p.add_argument("--pause-seconds", type=float, default=3.0,
                   help="an armed pause lasts this long to 1.5 times as long (default 3; "
                   "longer than --storm-grace-seconds plus one recovery run)")
    p.add_argument("--storm-grace-seconds", type=float, default=0.0,
                   help="grace period of the recovery storm (default 0) and of the "
                   "operator-mistake runs' recovery is always 0")
    p.add_argument("--oversize-rate", type=float, default=0.03,
                   help="share of operations that send a message over the topic's "
                   f"max.message.bytes ({OVERSIZE_LIMIT}), in every phase (default 0.03)")
    p.add_argument("--skew-seconds", type=float, default=600.0,
                   help="clock-skew: w0's clock is this far behind, w1's this far ahead")
    p.add_argument("--second-stack-dir", default=str(ROOT / ".stack" / "faults2"),
                   help="operator-mistake: the second Kafka cluster's stack instance "
                   "(default .stack/faults2; started only for that fault)")
    p.add_argument("--second-port-offset", type=int, default=2000,
                   help="its port offset (default 2000)")
    p.add_argument("--stack-dir", default=str(ROOT / ".stack" / "faults"),
                   help="the campaign's stack instance (default .stack/faults)")
    p.add_argument("--port-offset", type=int, default=1000,
                   help="its ports: the default stack's plus this (default 1000)")
    p.add_argument("--keep-stack", action="store_true",
                   help="leave the campaign's stack running afterwards")
    p.add_argument("--out", default=None,
                   help="results folder (default faults-results/<time>-s<seed>)")
    return p


def run(s: Settings) -> int:
    """The whole campaign on its own stack instance (stopped afterwards unless
    ``--keep-stack``); the exit status."""
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-s{s.seed}"
    out = Path(s.out or ROOT / "faults-results" / run_id)
    out.mkdir(parents=True, exist_ok=True)
    s.out = str(out)
    (out / "settings.json").write_text(json.dumps(asdict(s), indent=1))
    print(f"seed={s.seed}", flush=True)
    print(f"command: {s.command}", flush=True)
    say(f"results in {out}")
    t0 = time.monotonic()
    Path(s.stack_dir).mkdir(parents=True, exist_ok=True)
    lock = (Path(s.stack_dir) / "campaign.lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise CampaignError(f"another campaign is running on the stack instance {s.stack_dir}; "
                            "give this one its own: --stack-dir DIR --port-offset N") from None
    try:
        return _run(s, run_id, out, t0)
    finally:
        if not s.keep_stack:
            try:
                stop_stack()
            except AssertionError as exc:
                say(f"could not stop the campaign's stack: {exc}")
            if "operator-mistake" in s.faults:
                stop_second_stack(s)
        lock.close()


def _run(s: Settings, run_id: str, out: Path, t0: float) -> int:
    env = start_stack(s)
    if "clock-skew" in s.faults:
        setup_clock_skew(s)
    second_bootstrap = None
    if "operator-mistake" in s.faults:
        second_bootstrap = start_second_stack(s)
    started_stack = time.monotonic() - t0
    services, table, topic, decision_topic = prepare_data(s, env, run_id)
    heal(s, services.toxiproxy_url)
    journal = Journal(out / "events.jsonl")
    recoveries = Recoveries(s, services, decision_topic, out, journal)
    camp = Campaign(s, services, table, topic, decision_topic, out, journal, recoveries)
    if second_bootstrap is not None:
        # The mistakes' topics exist and are empty: a decision topic of the right name on
        # the other cluster, and a wrong name on the right one.
        recoveries.second_bootstrap = second_bootstrap
        recoveries.wrong_decision_topic = f"{decision_topic}-wrong"
        create_topic(second_bootstrap, decision_topic, partitions=3, replication_factor=1)
        create_topic(services.bootstrap, recoveries.wrong_decision_topic, partitions=3,
                     replication_factor=3 if s.brokers >= 3 else 1)
    if any(k in PIPELINE_KINDS for k in s.faults):
        camp.pipeline = Pipeline(s, services, run_id, decision_topic)
    rng = random.Random(s.seed)
    phases = make_plans(s, rng)
    plan = {o["op"]: o for kind, ops in phases if kind not in PIPELINE_KINDS for o in ops}
    stop_recovery = threading.Event()
    recovery_thread = threading.Thread(target=recoveries.recovery_loop, args=(stop_recovery,),
                                       daemon=True, name="recovery-loop")
    recovery_thread.start()
    phase_info = []
    try:
        for idx, (kind, ops) in enumerate(phases):
            phase_info.append(camp.run_phase(idx, kind, ops))
    finally:
        stop_recovery.set()
        recovery_thread.join(400)
    journal.phase = "final-recovery"
    camp.continue_all()
    heal(s, services.toxiproxy_url)
    # Past transaction.timeout.ms (10 s): open Kafka transactions of killed producers are
    # aborted by the broker; past the grace period: every in-doubt one is recovery's.
    say(f"faults stopped; recovery until it exits 0 (grace {s.grace_seconds:g} s)")
    runs = recoveries.final_recovery()
    say(f"recovery exited 0 after {runs} run(s); checking")
    lines = load_logs(sorted(out.glob("phase-*/log-w*.jsonl")))
    for ln in lines:
        if ln.get("event") == "recover_own":
            recoveries.resolved.update(ln.get("committed", []))
            recoveries.resolved.update(ln.get("rolled_back", []))
    result = run_check(
        dsn=services.dsn, bootstrap=services.bootstrap, name=NAME, table=table, topic=topic,
        decision_topic=decision_topic, messages_per_op=s.messages_per_op, plan=plan,
        lines=lines, resolved_by_recovery=recoveries.resolved,
        faults_per_kind=journal.faults_per_kind, exclude_gid=is_stage_gid,
    )
    pipeline_lines: list[str] = []
    if camp.pipeline is not None:
        pres = check_pipeline(
            dsn=services.dsn, bootstrap=services.bootstrap, name=NAME,
            sink=camp.pipeline.sink, decision_topic=decision_topic,
            phases=camp.pipeline.phases, resolved_by_recovery=recoveries.resolved,
            faults_per_kind=journal.faults_per_kind)
        fold(result, pres)
        pipeline_lines = describe(pres, s, phase_info, out / "events.jsonl")
    text, incomplete = write_summary(
        s, out, result, plan=plan, phase_info=phase_info, lines=lines,
        faults_per_kind=journal.faults_per_kind, started_stack=started_stack,
        elapsed=time.monotonic() - t0, extra=pipeline_lines)
    journal.close()
    recoveries.close()
    print(text, flush=True)
    if not result.ok:
        return EXIT_FAILED
    return EXIT_ERROR if incomplete else 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Stop cleanly (workers killed, stack down) on SIGTERM, and on SIGINT even when started
    # in the background (which ignores it).
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 10**9)
    if args.workers < 1 or args.ops < 1 or args.stages < 1:
        print("faults: error: --workers, --stages and --ops must be positive",
              file=sys.stderr)
        return EXIT_ERROR
    s = Settings(
        ops=args.ops, faults=args.faults, seed=seed, workers=args.workers,
        brokers=args.brokers, kills_per_point=args.kills_per_point,
        phase_seconds=args.phase_seconds, grace_seconds=args.grace_seconds,
        recovery_interval=args.recovery_interval, messages_per_op=args.messages_per_op,
        jitter_kafka_ms=args.jitter_kafka_ms, jitter_pg_ms=args.jitter_pg_ms,
        stack_dir=str(Path(args.stack_dir).resolve()), port_offset=args.port_offset,
        keep_stack=args.keep_stack, out=args.out or "", group_commit=args.group_commit,
        threads=args.threads if args.threads is not None else (4 if args.group_commit else 1),
        pauses_per_step=args.pauses_per_step, pause_seconds=args.pause_seconds,
        storm_grace=args.storm_grace_seconds, oversize_rate=args.oversize_rate,
        skew_seconds=args.skew_seconds,
        second_stack_dir=str(Path(args.second_stack_dir).resolve()),
        second_port_offset=args.second_port_offset, stages=args.stages, driver=args.driver,
    )
    s.command = "scripts/faults " + " ".join(shlex.quote(a) for a in (
        argv if argv is not None else sys.argv[1:]))
    if args.seed is None:
        s.command += f" --seed {seed}"
    try:
        return run(s)
    except CampaignError as exc:
        print(f"faults: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("faults: interrupted", file=sys.stderr)
        return 130
