"""``python -m recovery status`` after real crashes (``crash_lab.py``): one row per
in-doubt transaction with what its decision log says and what recovery would do, as a
table and as JSON -- and nothing changed: everything stays prepared, and producer
sessions of the gids' transactional ids, started before ``status``, still commit (no
fence). Then the progress of a long recovery run: INFO lines on a pipe, one redrawn line
on a terminal.
"""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from confluent_kafka import Producer
from psycopg import sql

from coordinator.decision_log import partition_for
from coordinator.gid import parse
from coordinator.prepared import list_prepared
from tests.crash import indoubt
from tests.crash.checker import merge_logs
from tests.integration.crash_lab import ROOT, Crashes, crash_gid, crash_lab, op_ids
from tests.plugins.kafka_helpers import transactional_producer

if TYPE_CHECKING:
    from tests.integration.conftest import Env

pytestmark = [pytest.mark.integration, pytest.mark.faults]

GAP = 10.0
"""Seconds between the old transactions' PREPARE and the young one's, at least: the grace
period given to ``status`` falls in between (a liveness bound: ``status`` must list within
this long after the ages were taken)."""
TIMEOUT = 180.0


@pytest.fixture
def lab(env: Env, tmp_path: Path) -> Iterator[Crashes]:
    with crash_lab(env, tmp_path) as c:
        yield c


def _env_without_services() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k not in ("PG_DSN", "KAFKA_BOOTSTRAP_SERVERS")}


def run_status(env: Env, *args: str, bootstrap: str | None = None
               ) -> subprocess.CompletedProcess[str]:
    """``recovery status`` as a subprocess; no ``--decision-topic``: it finds the topic the
    coordinators registered. ``bootstrap`` ``None``: no Kafka settings at all."""
    cmd = [sys.executable, "-m", "recovery", "status", "--postgres", env.dsn,
           "--name", env.name, *(["--bootstrap-servers", bootstrap] if bootstrap else []),
           *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT,
                          check=False, env=_env_without_services())


def ages(env: Env) -> dict[str, float]:
    with psycopg.connect(env.dsn, autocommit=True) as conn:
        return {t.text: t.age_seconds for t in list_prepared(conn, env.name)}


def wait_older(env: Env, gids: list[str], seconds: float) -> None:
    deadline = time.monotonic() + seconds + 30
    while min(ages(env)[g] for g in gids) < seconds:
        assert time.monotonic() < deadline
        time.sleep(0.2)


def grace_between(env: Env, old: list[str], young: str) -> float:
    """A grace period the old gids are past and the young one is within (for the next
    ``GAP`` seconds)."""
    now = ages(env)
    grace = min(now[g] for g in old) - 0.5
    assert now[young] < grace - GAP / 2, now
    return round(grace, 3)


# -- status ---------------------------------------------------------------------------


def test_status_table_and_json_change_nothing(lab: Crashes) -> None:
    env = lab.env
    # Three instances, three crashes. ka: no decision (its Kafka transaction left open);
    # kb: decision committed; kc, GAP seconds later: decision committed, young.
    assert partition_for("ka", 0, 3) != partition_for("kb", 0, 3)
    pa, oa = lab.start_worker(prefix="ka", crash_at="after_prepare", instance="ka")
    pb, ob = lab.start_worker(prefix="kb", crash_at="after_commit", instance="kb")
    logs = [lab.wait_worker(pa, oa, killed=True), lab.wait_worker(pb, ob, killed=True)]
    undecided, decided = (crash_gid(lg) for lg in logs)
    wait_older(env, [undecided, decided], GAP)
    logs.append(lab.crash(prefix="kc", crash_at="after_commit", instance="kc"))
    young = crash_gid(logs[-1])
    gids = sorted([undecided, decided, young])
    assert sorted(lab.prepared()) == gids
    rows = lab.rows()

    # A live producer session on each gid's transactional.id, begun before status (the
    # one of ka aborts the crashed worker's open transaction, as its restart would).
    live_topic = env.topic()
    sessions: dict[str, Producer] = {}
    for gid in gids:
        tid = parse(gid).transactional_id
        p = transactional_producer(env.bootstrap, tid)
        p.begin_transaction()
        p.produce(live_topic, key=tid.encode(), value=b"live")
        p.flush(30)
        sessions[tid] = p

    grace = grace_between(env, [undecided, decided], young)
    done = run_status(env, "--json", "--grace-seconds", str(grace), bootstrap=env.bootstrap)
    assert done.returncode == 1, done  # two in doubt past the grace period, as `list`
    view = json.loads(done.stdout)
    assert view["decision_log_read"] is True and view["changed"] is False
    assert view["note"] is None and view["grace_seconds"] == grace
    by_gid: dict[str, dict[str, Any]] = {r["gid"]: r for r in view["in_doubt"]}
    assert sorted(by_gid) == gids
    now = ages(env)
    assert [r["gid"] for r in view["in_doubt"]] == sorted(gids, key=lambda g: -now[g])
    d, u, y = by_gid[decided], by_gid[undecided], by_gid[young]
    assert (d["instance"], d["past_grace"], d["decision_log"], d["action"]) == (
        "kb", True, "found", "commit")
    assert (u["instance"], u["past_grace"], u["decision_log"], u["action"]) == (
        "ka", True, "absent", "roll_back_after_fencing")
    assert u["transactional_id"] in u["reason"] and "fence" in u["reason"]
    assert (y["instance"], y["past_grace"], y["decision_log"], y["action"],
            y["after_grace"]) == ("kc", False, "found", "wait", "commit")
    for gid, r in by_gid.items():
        assert r["transactional_id"] == parse(gid).transactional_id
        assert r["decision_partition"] == parse(gid).partition
        assert r["age_seconds"] >= 0

    grace = grace_between(env, [undecided, decided], young)
    done = run_status(env, "--grace-seconds", str(grace), bootstrap=env.bootstrap)
    assert done.returncode == 1, done
    out = done.stdout
    assert "3 in-doubt transaction(s)" in out and "2 past the grace period" in out
    assert "nothing was changed" in out
    header = next(line for line in out.splitlines() if line.startswith("AGE"))
    assert header.split() == ["AGE", "INSTANCE", "DECISION", "LOG", "RECOVERY", "WOULD", "GID"]
    line = {g: next(ln for ln in out.splitlines() if ln.endswith(g)) for g in gids}
    assert re.search(r"\bkb +commit decision found +commit +pk2pc2:", line[decided])
    assert re.search(r"\bka +none found up to the end +roll back after fencing +pk2pc2:",
                     line[undecided])
    assert re.search(r"\bkc +commit decision found +wait: within grace \(\S+ left\), then "
                     r"commit +pk2pc2:", line[young])
    assert "roll back after fencing: no decision record is visible" in out

    # --instance: that instance's rows only.
    done = run_status(env, "--json", "--instance", "kb", "--grace-seconds", str(grace),
                      bootstrap=env.bootstrap)
    assert done.returncode == 1, done
    view = json.loads(done.stdout)
    assert view["instance"] == "kb"
    assert [(r["gid"], r["action"]) for r in view["in_doubt"]] == [(decided, "commit")]

    # Nothing changed: still prepared, same rows, and nobody was fenced -- every session
    # begun before status commits.
    assert sorted(lab.prepared()) == gids
    assert lab.rows() == rows
    for p in sessions.values():
        p.commit_transaction(30)
    assert sorted(r.key or b"" for r in env.read(live_topic)) == sorted(
        t.encode() for t in sessions)

    final = lab.recover()
    assert final.returncode == 0, final
    assert sorted(final.report["committed"]) == sorted([decided, young])
    assert final.report["rolled_back"] == [undecided]
    lab.check([*op_ids("ka"), *op_ids("kb"), *op_ids("kc")], merge_logs(logs))


def test_status_without_kafka_and_with_kafka_unreachable(lab: Crashes) -> None:
    env = lab.env
    log = lab.crash(prefix="n", crash_at="after_commit")
    gid = crash_gid(log)

    # No Kafka settings: PostgreSQL's view, with a note.
    done = run_status(env, "--json", "--grace-seconds", "0")
    assert done.returncode == 1, done
    view = json.loads(done.stdout)
    assert view["decision_log_read"] is False and "no Kafka settings" in view["note"]
    [row] = view["in_doubt"]
    assert (row["gid"], row["decision_log"], row["action"]) == (gid, "not_read", "unknown")
    text = run_status(env, "--grace-seconds", "3600")
    assert text.returncode == 0, text  # within the grace period: as `list`
    assert "note: no Kafka settings" in text.stdout and gid in text.stdout
    assert "wait: within grace" in text.stdout and "then unknown [1]" in text.stdout

    # Kafka unreachable: the log is not read, recovery would leave it, with the reason.
    done = run_status(env, "--json", "--grace-seconds", "0", bootstrap="127.0.0.1:1")
    assert done.returncode == 1, done
    [row] = json.loads(done.stdout)["in_doubt"]
    assert (row["decision_log"], row["action"]) == ("not_read", "leave")
    assert "unreachable" in row["reason"]

    assert lab.prepared() == [gid]
    final = lab.recover()
    assert final.report["committed"] == [gid]
    lab.check(op_ids("n"), log)


def test_status_with_nothing_in_doubt(env: Env) -> None:
    done = run_status(env, "--json", bootstrap=env.bootstrap)
    assert done.returncode == 0, done
    assert json.loads(done.stdout)["in_doubt"] == []
    done = run_status(env, bootstrap=env.bootstrap)
    assert done.returncode == 0 and "0 in-doubt transaction(s)" in done.stdout


# -- progress of a long recovery run ----------------------------------------------------


TABLE = "progress_ops"


def make_in_doubt(env: Env, count: int) -> tuple[set[str], set[str]]:
    """``count`` in-doubt transactions made in-process (``tests/crash/indoubt.py``): half
    with a committed decision, half without. Returns (to commit, to roll back)."""
    env.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} (op_id text PRIMARY KEY)").format(
        sql.Identifier(TABLE)))
    topic = env.topic()
    insert = sql.SQL("INSERT INTO {} (op_id) VALUES (%s)").format(sql.Identifier(TABLE))
    coord = env.new_coordinator(producers=2, on_step=indoubt.on_step)
    commit: set[str] = set()
    roll_back: set[str] = set()
    coord.open()
    try:
        for k in range(count):
            mode = indoubt.MODES[k % 2]
            op = f"op-{k}-{os.urandom(4).hex()}"
            gid = indoubt.make_in_doubt(coord, mode, insert, (op,), [(topic, op.encode(),
                                                                       b"v")])
            (commit if mode == "after_commit" else roll_back).add(gid)
    finally:
        coord.close()
    return commit, roll_back


def recovery_cmd(env: Env, *args: str) -> list[str]:
    return [sys.executable, "-m", "recovery", "--postgres", env.dsn, "--bootstrap-servers",
            env.bootstrap, "--name", env.name, "--grace-seconds", "0",
            "--progress-interval", "0.01", *args]


PROGRESS = re.compile(r"recovery progress: (\d+)/(\d+) done \(\d+%\): committed (\d+), "
                      r"rolled back (\d+), skipped (\d+), left in doubt (\d+); ([^;]+);")


def test_progress_logged_during_a_long_run(env: Env) -> None:
    commit, roll_back = make_in_doubt(env, 40)
    done = subprocess.run(recovery_cmd(env, "--json"), cwd=ROOT, capture_output=True,
                          text=True, timeout=TIMEOUT, check=False,
                          env=_env_without_services())
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report["committed"]) == commit and set(report["rolled_back"]) == roll_back
    lines = [m.groups() for m in map(PROGRESS.search, done.stderr.splitlines()) if m]
    assert len(lines) >= 2, done.stderr  # a periodic line (or more), then the final one
    counts = [tuple(int(x) for x in g[:6]) for g in lines]
    assert all(c[1] == 40 for c in counts)
    assert [c[0] for c in counts] == sorted(c[0] for c in counts)  # done only grows
    assert all(c[0] == c[2] + c[3] + c[4] + c[5] for c in counts)
    assert counts[-1] == (40, 40, 20, 20, 0, 0) and lines[-1][6] == "finished"
    assert "\r" not in done.stderr  # not a terminal: no progress line
    assert env.prepared() == []


def test_progress_line_on_a_terminal(env: Env) -> None:
    make_in_doubt(env, 10)
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(recovery_cmd(env), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=secondary, env=_env_without_services())
    os.close(secondary)
    chunks: list[bytes] = []
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(primary)
    assert proc.stdout is not None
    stdout = proc.stdout.read().decode()
    proc.stdout.close()
    assert proc.wait(TIMEOUT) == 0, b"".join(chunks)
    tty = b"".join(chunks).decode(errors="replace")
    assert "\rrecovery: " in tty and "\x1b[K" in tty, tty
    assert "recovery progress: 10/10 done (100%): committed 5, rolled back 5" in tty
    # The line is erased before the last words (the final INFO line).
    tail = tty[tty.rindex("\rrecovery: "):]
    assert re.search(r"\x1b\[K\r\x1b\[K.*recovery progress: 10/10 .*finished", tail,
                     re.DOTALL), tail
    assert "commit: 5, roll back: 5" in stdout
    assert env.prepared() == []
