"""Command line of `scripts/stack`: up, env, status, down, reset and fault-injection helpers."""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from . import kafka, kafka_install, postgres, toxiproxy
from .common import (
    STACK_DIR,
    VENV_PYTHON,
    StackError,
    ensure_port_free,
    require_command,
    say,
    stack_lock,
)
from .venv import ensure_venv

EXIT_NOT_UP = 3


def _all_serving(cluster: kafka.Cluster) -> bool:
    return (
        VENV_PYTHON.exists()
        and postgres.serving()
        and all(b.serving() for b in cluster.brokers)
        and (not cluster.proxied or toxiproxy.serving())
    )


def _install() -> tuple[str, Path]:
    """Everything `up` needs on disk: Debian packages, the Kafka jars, .venv."""
    ensure_venv()
    java = kafka_install.ensure_java()
    libs = kafka_install.ensure_jars()
    postgres.ensure_installed()
    # libfaketime: the tests run a coordinator with a skewed clock.
    require_command("faketime", "faketime", "libfaketime (used by the clock-skew tests)")
    return java, libs


def _check_ports(cluster: kafka.Cluster) -> None:
    """Before starting anything: every port a stopped service needs must be free."""
    for broker in cluster.brokers:
        if broker.pid() is None:
            ensure_port_free(broker.client_port, f"Kafka broker {broker.id}")
            ensure_port_free(broker.controller_port, f"Kafka controller {broker.id}")
    if postgres.running_pid() is None:
        ensure_port_free(postgres.PG_PORT, "PostgreSQL")


def cmd_up(args: argparse.Namespace) -> int:
    started = time.monotonic()
    with stack_lock():
        size = args.brokers or kafka.planned_cluster().size
        existing = kafka.load_cluster()
        if (existing is not None and existing.size == size
                and (existing.proxied or not args.toxiproxy) and _all_serving(existing)):
            say("already up")
            return 0
        java, libs = _install()
        cluster = kafka.obtain_cluster(size, proxied=args.toxiproxy)
        _check_ports(cluster)
        for broker in cluster.brokers:
            kafka.start_broker(java, libs, cluster, broker)
        postgres.start()
        postgres.wait_ready()
        kafka.wait_ready(cluster, cluster.brokers)
        if cluster.proxied:
            toxiproxy.start(cluster)
    say(f"up in {time.monotonic() - started:.1f} s; use it with: eval \"$(scripts/stack env)\"")
    return 0


def cmd_install(_: argparse.Namespace) -> int:
    with stack_lock():
        _install()
    say("installed: Debian packages, Kafka jars, .venv")
    return 0


def cmd_venv(_: argparse.Namespace) -> int:
    with stack_lock():
        ensure_venv()
    return 0


def cmd_env(_: argparse.Namespace) -> int:
    cluster = kafka.planned_cluster()
    print(f"export PG_DSN={shlex.quote(postgres.DSN)}")
    print(f"export KAFKA_BOOTSTRAP_SERVERS={shlex.quote(cluster.bootstrap)}")
    if cluster.proxied:
        print(f"export TOXIPROXY_URL={shlex.quote(toxiproxy.API_URL)}")
        print(f"export PG_PROXY_DSN={shlex.quote(postgres.PROXY_DSN)}")
        print(f"export KAFKA_PROXY_BOOTSTRAP_SERVERS={shlex.quote(cluster.proxy_bootstrap)}")
    return 0


def cmd_status(_: argparse.Namespace) -> int:
    cluster = kafka.planned_cluster()
    pg_up, pg_line = postgres.status_line()
    kafka_up, kafka_lines = kafka.status_lines(cluster)
    for line in [pg_line, *kafka_lines]:
        print(line)
    toxi_up = True
    if cluster.proxied:
        toxi_up, toxi_line = toxiproxy.status_line()
        print(toxi_line)
    print(f"other logs (downloads, initdb, pip, apt): {STACK_DIR}/*.log")
    up = pg_up and kafka_up and toxi_up
    print("stack: UP" if up else "stack: NOT (fully) UP; start it with `scripts/stack up`")
    return 0 if up else EXIT_NOT_UP


def _stop_all() -> None:
    toxiproxy.stop()
    kafka.stop_brokers(kafka.known_brokers())
    postgres.stop("fast")
    left = [b.id for b in kafka.known_brokers() if b.pid() is not None]
    if left or postgres.running_pid() is not None or toxiproxy.pid() is not None:
        raise StackError(f"still running after down: brokers {left}, "
                         f"postgres pid {postgres.running_pid()}, "
                         f"toxiproxy pid {toxiproxy.pid()}")


def cmd_down(_: argparse.Namespace) -> int:
    with stack_lock():
        _stop_all()
    say("down: no stack process is left")
    return 0


def cmd_reset(_: argparse.Namespace) -> int:
    with stack_lock():
        _stop_all()
        shutil.rmtree(kafka.KAFKA_DIR, ignore_errors=True)
        shutil.rmtree(toxiproxy.HOME, ignore_errors=True)
        postgres.remove_cluster()
    say("reset: data deleted (the Kafka jars and .venv are kept); `scripts/stack up` remakes it")
    return 0


def _existing_cluster() -> kafka.Cluster:
    cluster = kafka.load_cluster()
    if cluster is None:
        raise StackError("no Kafka cluster yet; run `scripts/stack up` first")
    return cluster


def cmd_kill_kafka(args: argparse.Namespace) -> int:
    with stack_lock():
        kafka.kill_broker(_existing_cluster().broker(args.broker))
    return 0


def cmd_start_kafka(args: argparse.Namespace) -> int:
    with stack_lock():
        cluster = _existing_cluster()
        broker = cluster.broker(args.broker)
        java, libs = kafka_install.ensure_java(), kafka_install.ensure_jars()
        kafka.start_broker(java, libs, cluster, broker)
        kafka.wait_ready(cluster, [broker])
    return 0


def cmd_pg_stop_immediate(_: argparse.Namespace) -> int:
    with stack_lock():
        postgres.stop("immediate")
    return 0


def cmd_pg_start(_: argparse.Namespace) -> int:
    with stack_lock():
        postgres.start()
        postgres.wait_ready()
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/stack",
        description="A local Apache Kafka (KRaft) + PostgreSQL for development and tests.",
        epilog="A second, independent stack: STACK_DIR=<folder> STACK_PORT_OFFSET=<n> "
        "scripts/stack ... (its own data, pid files and logs in <folder>, every port plus "
        "<n>; the Kafka jars and Toxiproxy build are shared).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands: list[tuple[str, Callable[[argparse.Namespace], int], str]] = [
        ("up", cmd_up, "install what is missing, start both services, wait until they serve"),
        ("install", cmd_install, "only install (Debian packages, Kafka jars, .venv)"),
        ("venv", cmd_venv, "only create .venv when it is missing"),
        ("env", cmd_env, "print export lines: eval \"$(scripts/stack env)\""),
        ("status", cmd_status, "what runs, where, logs; exit 0 when all up, 3 otherwise"),
        ("down", cmd_down, "stop both services cleanly"),
        ("reset", cmd_reset, "down, then delete the data (keeps jars and .venv)"),
        ("kill-kafka", cmd_kill_kafka, "fault injection: SIGKILL one Kafka broker"),
        ("start-kafka", cmd_start_kafka, "start one Kafka broker and wait until it serves"),
        ("pg-stop-immediate", cmd_pg_stop_immediate, "fault injection: pg_ctl stop -m immediate"),
        ("pg-start", cmd_pg_start, "start PostgreSQL and wait until it serves"),
    ]
    for name, handler, help_text in commands:
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(handler=handler)
        if name == "up":
            command.add_argument("--brokers", type=int, choices=range(1, 10), metavar="N",
                                 help="number of Kafka brokers (default: as made before, else 1)")
            command.add_argument("--toxiproxy", action="store_true",
                                 help="also run Toxiproxy in front of PostgreSQL and every "
                                 "broker (a PROXIED Kafka listener; kept from then on); "
                                 "`env` then prints PG_PROXY_DSN, KAFKA_PROXY_BOOTSTRAP_SERVERS "
                                 "and TOXIPROXY_URL")
        if name in ("kill-kafka", "start-kafka"):
            command.add_argument("--broker", type=int, default=1, metavar="ID",
                                 help="broker id (default 1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except StackError as exc:
        print(f"stack: error: {exc}", file=sys.stderr)
        return 1
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"stack: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stack: interrupted", file=sys.stderr)
        return 130
    return code
