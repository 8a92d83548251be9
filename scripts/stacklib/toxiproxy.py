"""Toxiproxy (github.com/Shopify/toxiproxy) in front of PostgreSQL and every Kafka broker.

Started by `scripts/stack up --toxiproxy`; fault-injection code adds and removes toxics
through its HTTP API (see tests/faults/toxiproxy.py). Built from the Go module proxy with
`go install` into the shared cache (nothing is downloaded from anywhere else):
    .stack/toxiproxy-<version>/bin/server     the binary (`go install` names it `server`)
    .stack/go/                                GOPATH and GOCACHE of that build
Per stack instance (STACK_DIR):
    toxiproxy/proxies.json   the proxies, loaded at start (-config)
    toxiproxy/toxiproxy.pid  toxiproxy.log
Ports (plus STACK_PORT_OFFSET): the API on 127.0.0.1:29080; proxy "postgres" listens on
127.0.0.1:25433 -> PostgreSQL 25432; proxy "kafka-<id>" on 127.0.0.1:(29130 + id) -> the
broker's PROXIED listener 127.0.0.1:(29120 + id), which advertises the proxy's address.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from . import kafka, postgres
from .common import (
    CACHE_DIR,
    LOOPBACK,
    PORT_OFFSET,
    STACK_DIR,
    StackError,
    cache_lock,
    ensure_port_free,
    process_runs,
    read_pid,
    require_command,
    run_logged,
    say,
    tail,
    wait_for_exit,
)

VERSION = "v2.5.0"
"""Pinned: the version `go install ...@latest` resolved to when this was written."""
MODULE = "github.com/Shopify/toxiproxy/v2/cmd/server"
BIN = CACHE_DIR / f"toxiproxy-{VERSION}" / "bin" / "server"
GO_DIR = CACHE_DIR / "go"
HOME = STACK_DIR / "toxiproxy"
PID_FILE = HOME / "toxiproxy.pid"
LOG = HOME / "toxiproxy.log"
CONFIG = HOME / "proxies.json"
API_PORT = 29080 + PORT_OFFSET
API_URL = f"http://{LOOPBACK}:{API_PORT}"
READY_TIMEOUT = 20.0


def _go() -> str:
    return require_command("go", "golang-go", "Go (needed to build Toxiproxy)",
                           Path("/usr/local/go/bin/go"), Path("/usr/lib/go/bin/go"))


def ensure_binary() -> Path:
    """Build Toxiproxy's server with `go install` unless the pinned version is built."""
    if BIN.exists():
        return BIN
    with cache_lock():
        if BIN.exists():
            return BIN
        go = _go()
        log = CACHE_DIR / "toxiproxy-build.log"
        say(f"building Toxiproxy {VERSION} from the Go module proxy (log {log})")
        env = {
            **os.environ,
            "GOBIN": str(BIN.parent),
            "GOPATH": str(GO_DIR),
            "GOCACHE": str(GO_DIR / "cache"),
            "GOFLAGS": "-modcacherw",  # so that the folder can simply be deleted
            "CGO_ENABLED": "0",
        }
        run_logged([go, "install", f"{MODULE}@{VERSION}"], log, "go install toxiproxy",
                   env=env, timeout=1200)
        if not BIN.exists():
            raise StackError(f"go install finished but {BIN} is missing; log {log}:\n{tail(log)}")
    return BIN


def proxies(cluster: kafka.Cluster) -> list[dict[str, Any]]:
    """The proxies this stack wants: PostgreSQL and every broker's PROXIED listener."""
    wanted = [{"name": "postgres", "listen": f"{LOOPBACK}:{postgres.PG_PROXY_PORT}",
               "upstream": f"{LOOPBACK}:{postgres.PG_PORT}", "enabled": True}]
    for b in cluster.brokers:
        wanted.append({"name": f"kafka-{b.id}", "listen": f"{LOOPBACK}:{b.proxy_front_port}",
                       "upstream": f"{LOOPBACK}:{b.proxied_port}", "enabled": True})
    return wanted


def pid() -> int | None:
    found = read_pid(PID_FILE)
    if found is None:
        return None
    if process_runs(found, str(BIN)):
        return found
    PID_FILE.unlink(missing_ok=True)
    return None


def api(method: str, path: str, body: Any = None, timeout: float = 5.0) -> Any:
    """One call of Toxiproxy's HTTP API; the decoded JSON answer (None when empty)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{API_URL}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        raw = response.read()
    return json.loads(raw) if raw.strip() else None


def serving() -> bool:
    if pid() is None:
        return False
    try:
        api("GET", "/proxies", timeout=1.0)
        return True
    except (OSError, ValueError):
        return False


def start(cluster: kafka.Cluster) -> None:
    """Start Toxiproxy (unless it runs) and make sure every proxy exists."""
    binary = ensure_binary()
    HOME.mkdir(parents=True, exist_ok=True)
    wanted = proxies(cluster)
    CONFIG.write_text(json.dumps(wanted, indent=2) + "\n")
    if pid() is None:
        ensure_port_free(API_PORT, "Toxiproxy's API")
        for proxy in wanted:
            ensure_port_free(int(proxy["listen"].rsplit(":", 1)[1]), f"proxy {proxy['name']}")
        with LOG.open("ab") as log:
            log.write(f"\n===== scripts/stack starts Toxiproxy at {time.ctime()}\n".encode())
            log.flush()
            process = subprocess.Popen(
                [str(binary), "-host", LOOPBACK, "-port", str(API_PORT), "-config", str(CONFIG)],
                cwd=HOME, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, env={**os.environ, "LOG_LEVEL": "info"},
            )
        PID_FILE.write_text(f"{process.pid}\n")
        say(f"started Toxiproxy {VERSION} (pid {process.pid}, API {API_URL}, log {LOG})")
        _wait_ready(process)
    elif not serving():
        raise StackError(f"Toxiproxy (pid {pid()}) runs but its API {API_URL} does not answer; "
                         f"last lines of {LOG}:\n{tail(LOG)}")
    existing = api("GET", "/proxies") or {}
    for proxy in wanted:
        have = existing.get(proxy["name"])
        if have is not None and (have.get("listen"), have.get("upstream")) == (
                proxy["listen"], proxy["upstream"]):
            continue
        if have is not None:
            api("DELETE", f"/proxies/{proxy['name']}")
        api("POST", "/proxies", proxy)


def _wait_ready(process: subprocess.Popen[bytes]) -> None:
    """Wait for the API of the process just started. (Not with pid(): right after exec,
    /proc/<pid>/cmdline can still be empty for an instant.)"""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            api("GET", "/proxies", timeout=1.0)
            return
        except (OSError, ValueError):
            pass
        if process.poll() is not None:
            raise StackError(f"Toxiproxy exited while starting; last lines of {LOG}:\n{tail(LOG)}")
        if time.monotonic() > deadline:
            raise StackError(f"Toxiproxy's API did not answer within {READY_TIMEOUT:.0f} s; "
                             f"last lines of {LOG}:\n{tail(LOG)}")
        time.sleep(0.1)


def stop() -> None:
    """SIGTERM Toxiproxy (by its pid file), SIGKILL when it does not go."""
    found = pid()
    if found is None:
        return
    say(f"stopping Toxiproxy (pid {found})")
    os.kill(found, signal.SIGTERM)
    if not wait_for_exit(found, 10):
        os.kill(found, signal.SIGKILL)
        wait_for_exit(found, 10)
    PID_FILE.unlink(missing_ok=True)


def status_line() -> tuple[bool, str]:
    found = pid()
    up = found is not None and serving()
    state = f"running, pid {found}" if up else (f"NOT SERVING, pid {found}" if found else
                                                  "stopped")
    return up, (f"toxiproxy: {state}; API {API_URL}; postgres via "
                f"{LOOPBACK}:{postgres.PG_PROXY_PORT}; log {LOG}")
