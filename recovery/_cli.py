"""Command line: ``python -m recovery [recover|status|list] --postgres DSN ...``.

Exit codes: 0 nothing of ours remains in doubt past the grace period;
1 some remain (listed, with the reason); 2 configuration or connection error
(nothing was changed). ``status`` and ``list`` change nothing: 1 when something
is in doubt past the grace period.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import psycopg

from coordinator.prepared import list_prepared

from ._model import RecoveryReport
from ._progress import Progress, TerminalLine
from ._status import status
from ._worker import RecoveryConfig, RecoveryError, recover

__all__ = ["main"]

EXIT_OK, EXIT_REMAINING, EXIT_CONFIG = 0, 1, 2
PUSH_JOB = "pk2pc_recovery"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m recovery",
        description="Resolve in-doubt PostgreSQL prepared transactions of a pg-kafka-2pc "
        "coordinator from its Kafka decision log. Safe to run at any time, repeatedly, "
        "and by several workers at once.",
    )
    p.add_argument("command", nargs="?", choices=["recover", "list", "status"],
                   default="recover", help="recover (default); status: each in-doubt "
                   "transaction, what its decision log says and what recovery would do now "
                   "(reads the log without fencing; changes nothing); list: PostgreSQL's "
                   "view only (gids and ages)")
    p.add_argument("--postgres", default=os.environ.get("PG_DSN"),
                   help="PostgreSQL conninfo of the coordinator's database (default: $PG_DSN; "
                   "put the password in PGPASSWORD or ~/.pgpass, not on the command line)")
    p.add_argument("--bootstrap-servers", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS"),
                   help="Kafka bootstrap servers (default: $KAFKA_BOOTSTRAP_SERVERS)")
    p.add_argument("--name", required=True, help="the coordinator's name")
    p.add_argument("--instance", help="only this coordinator instance's transactions")
    p.add_argument("--kafka-config", action="append", default=[], metavar="KEY=VALUE",
                   help="extra librdkafka setting (repeatable), e.g. security.protocol=SSL")
    p.add_argument("--decision-topic", default=None,
                   help="the decision topic, when the coordinators' registration cannot be "
                   "read; must match it otherwise. Gids whose decision log (cluster, topic, "
                   "topic id) is not the one read are never decided from it")
    p.add_argument("--transaction-timeout-ms", type=int, default=None,
                   help="transaction.timeout.ms of the fencing producer (default: the "
                   "coordinator's registered value)")
    p.add_argument("--grace-seconds", type=float, default=RecoveryConfig().grace_seconds,
                   help="leave transactions younger than this alone (default %(default)s)")
    p.add_argument("--alert-after-seconds", type=float,
                   default=RecoveryConfig().alert_after_seconds)
    p.add_argument("--dry-run", action="store_true", help="decide and report, change nothing")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--progress-interval", type=float, default=5.0, metavar="SECONDS",
                   help="recover: log progress (done/total, committed, rolled back) every "
                   "SECONDS during a run longer than that (default %(default)s; on a "
                   "terminal, without --json, also a progress line)")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--metrics-file", metavar="PATH",
                   help="write the run's metrics there (node-exporter textfile format, "
                   "written atomically; counters continue from the file's previous values); "
                   "needs the extra pg-kafka-2pc[metrics]")
    p.add_argument("--pushgateway", metavar="URL",
                   help="push the run's metrics to this Prometheus Pushgateway (job "
                   f"{PUSH_JOB!r}, grouping key name); needs the extra pg-kafka-2pc[metrics]")
    return p


def _kafka_conf(args: argparse.Namespace) -> dict[str, Any]:
    conf: dict[str, Any] = {"bootstrap.servers": args.bootstrap_servers}
    for item in args.kafka_config:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RecoveryError(f"--kafka-config expects KEY=VALUE, got {item!r}")
        conf[key.strip()] = value
    return conf


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.progress_interval < 0:
        print("error: --progress-interval must be >= 0", file=sys.stderr)
        return EXIT_CONFIG
    # A progress line on a terminal, unless the output is for a machine.
    line = (TerminalLine(sys.stderr) if args.command == "recover" and not args.json
            and sys.stderr.isatty() else None)
    logging.basicConfig(level=args.log_level.upper(),
                        handlers=[line.handler() if line else logging.StreamHandler(sys.stderr)],
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if not args.postgres:
        print("error: --postgres (or $PG_DSN) is required", file=sys.stderr)
        return EXIT_CONFIG
    wants_metrics = args.metrics_file is not None or args.pushgateway is not None
    if wants_metrics and args.command != "recover":
        print("error: --metrics-file and --pushgateway apply to recover only", file=sys.stderr)
        return EXIT_CONFIG
    if wants_metrics and importlib.util.find_spec("prometheus_client") is None:
        print("error: --metrics-file and --pushgateway need prometheus-client: pip install "
              "'pg-kafka-2pc[metrics]'", file=sys.stderr)
        return EXIT_CONFIG
    try:
        if args.command == "list":
            return _list(args)
        if args.command == "status":
            return _status(args)
        if not args.bootstrap_servers:
            raise RecoveryError("--bootstrap-servers (or $KAFKA_BOOTSTRAP_SERVERS) is required")
        cfg = RecoveryConfig(
            decision_topic=args.decision_topic, grace_seconds=args.grace_seconds,
            instance=args.instance, dry_run=args.dry_run,
            alert_after_seconds=args.alert_after_seconds,
            transaction_timeout_ms=args.transaction_timeout_ms,
        )
        with Progress(args.progress_interval, display=line, dry_run=args.dry_run) as progress:
            report = recover(args.postgres, _kafka_conf(args), args.name, cfg,
                             progress=progress)
    except (RecoveryError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.json:
        print(json.dumps(report.as_json(), sort_keys=True))
    else:
        verb = "would " if report.dry_run else ""
        print(f"{verb}commit: {len(report.committed)}, {verb}roll back: "
              f"{len(report.rolled_back)}, skipped (resolved elsewhere): "
              f"{len(report.skipped)}, within grace period: {len(report.waiting)}, "
              f"remaining: {len(report.remaining)}")
        for r in report.remaining:
            print(f"remaining {r.gid}: {r.reason}")
    if wants_metrics:
        _publish(args, report)
    return report.exit_code


def _publish(args: argparse.Namespace, report: RecoveryReport) -> None:
    """Write/push the run's metrics. A failure is reported on stderr and does not
    change the exit code (the run's work is done); the metrics' last success time
    then stops moving, which is what the alert on it watches."""
    from prometheus_client import CollectorRegistry, push_to_gateway, write_to_textfile

    from .metrics import RecoveryMetrics

    registry = CollectorRegistry()
    metrics = RecoveryMetrics(registry)
    if args.metrics_file is not None:
        try:
            with open(args.metrics_file, encoding="utf-8") as f:
                metrics.carry_over(f.read(), args.name)
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            print(f"warning: cannot read the previous {args.metrics_file}, counters start "
                  f"from zero: {exc}", file=sys.stderr)
            registry = CollectorRegistry()  # nothing half carried over
            metrics = RecoveryMetrics(registry)
    metrics.publish(args.name, report)
    if args.metrics_file is not None:
        try:
            write_to_textfile(args.metrics_file, registry)
        except OSError as exc:
            print(f"error: writing metrics to {args.metrics_file} failed: {exc}",
                  file=sys.stderr)
    if args.pushgateway is not None:
        try:
            push_to_gateway(args.pushgateway, job=PUSH_JOB, registry=registry,
                            grouping_key={"name": args.name}, timeout=30)
        except OSError as exc:
            print(f"error: pushing metrics to {args.pushgateway} failed: {exc}",
                  file=sys.stderr)


def _status(args: argparse.Namespace) -> int:
    cfg = RecoveryConfig(
        decision_topic=args.decision_topic, grace_seconds=args.grace_seconds,
        instance=args.instance, dry_run=True,
    )
    kafka = _kafka_conf(args) if args.bootstrap_servers else None
    view = status(args.postgres, kafka, args.name, cfg)
    if args.json:
        print(json.dumps(view.as_json(), sort_keys=True))
    else:
        print(view.render())
    return view.exit_code


def _list(args: argparse.Namespace) -> int:
    try:
        with psycopg.connect(args.postgres, autocommit=True, connect_timeout=10) as conn:
            rows = list_prepared(conn, args.name, args.instance)
    except psycopg.Error as exc:
        raise RecoveryError(f"PostgreSQL unreachable: {exc}".strip()) from None
    past = [t for t in rows if t.age_seconds >= args.grace_seconds]
    if args.json:
        print(json.dumps({"in_doubt": [
            {"gid": t.text, "age_seconds": round(t.age_seconds, 3),
             "prepared": t.prepared.isoformat(), "owner": t.owner,
             "transactional_id": t.gid.transactional_id,
             "past_grace": t.age_seconds >= args.grace_seconds} for t in rows]}))
    else:
        print(f"{len(rows)} in-doubt transaction(s) of {args.name!r}, "
              f"{len(past)} past the grace period of {args.grace_seconds:g}s")
        for t in rows:
            print(f"{t.age_seconds:10.1f}s  {t.text}  (transactional.id {t.gid.transactional_id})")
    return EXIT_REMAINING if past else EXIT_OK
