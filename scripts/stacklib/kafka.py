"""Apache Kafka in KRaft mode from the official Maven Central jars, one process per broker.

Layout under .stack/ (git-ignored):
    kafka-<version>/libs/          jars fetched by Maven from scripts/kafka/pom.xml
    kafka-<version>/jars.complete  written after a complete download (else it is redone)
    kafka/cluster.json             cluster id and broker count chosen at the first `up`
    kafka/log4j2.yaml              logging: INFO to stdout, which goes to kafka.log
    kafka/broker-<id>/             server.properties, data/, kafka.log, kafka.pid
Broker <id> listens for clients on 127.0.0.1:(29090 + 2*id) and for the controller
quorum on the next port: broker 1 uses 29092/29093, brokers 2 and 3 use 29094/29095, 29096/29097.
The jars are shared by every stack instance (CACHE_DIR); with STACK_PORT_OFFSET every port
moves by the offset.

With `up --toxiproxy` (recorded in cluster.json as "proxied") each broker also has a PROXIED
listener on 127.0.0.1:(29120 + id) that advertises Toxiproxy's front port 127.0.0.1:(29130 + id)
(see toxiproxy.py): a client bootstrapping through Toxiproxy is told the proxied addresses of
every broker, so all its connections go through Toxiproxy.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from base64 import urlsafe_b64encode
from dataclasses import dataclass
from pathlib import Path

from .common import (
    LOOPBACK,
    PORT_OFFSET,
    ROOT,
    STACK_DIR,
    VENV_PYTHON,
    StackError,
    ensure_port_free,
    port_answers,
    process_runs,
    read_pid,
    run_logged,
    say,
    tail,
    wait_for_exit,
)

PROBE = ROOT / "scripts" / "kafka_probe.py"
KAFKA_DIR = STACK_DIR / "kafka"
CLUSTER_FILE = KAFKA_DIR / "cluster.json"
LOG4J_FILE = KAFKA_DIR / "log4j2.yaml"
BASE_PORT = 29090 + PORT_OFFSET
PROXIED_BASE_PORT = BASE_PORT + 30
"""Broker <id>'s PROXIED listener: PROXIED_BASE_PORT + id."""
PROXY_FRONT_BASE_PORT = BASE_PORT + 40
"""Toxiproxy's listener in front of broker <id>: PROXY_FRONT_BASE_PORT + id."""
READY_TIMEOUT = 90.0
PROBE_TIMEOUT = 20.0
STOP_TIMEOUT = 30.0

LOG4J_YAML = """\
# Written by scripts/stack: everything at INFO to stdout, which the stack sends to kafka.log.
Configuration:
  name: pg-kafka-2pc-stack
  Appenders:
    Console:
      name: STDOUT
      PatternLayout:
        pattern: "[%d] %p %m (%c)%n"
  Loggers:
    Root:
      level: INFO
      AppenderRef:
        - ref: STDOUT
"""


@dataclass(frozen=True)
class Broker:
    """One combined broker + controller process of the KRaft cluster."""

    id: int

    @property
    def dir(self) -> Path:
        return KAFKA_DIR / f"broker-{self.id}"

    @property
    def client_port(self) -> int:
        return BASE_PORT + 2 * self.id

    @property
    def controller_port(self) -> int:
        return self.client_port + 1

    @property
    def proxied_port(self) -> int:
        """The PROXIED listener (used only when the cluster is proxied)."""
        return PROXIED_BASE_PORT + self.id

    @property
    def proxy_front_port(self) -> int:
        """Toxiproxy's port in front of `proxied_port`: what the PROXIED listener advertises."""
        return PROXY_FRONT_BASE_PORT + self.id

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def props(self) -> Path:
        return self.dir / "server.properties"

    @property
    def pid_file(self) -> Path:
        return self.dir / "kafka.pid"

    @property
    def log_file(self) -> Path:
        return self.dir / "kafka.log"

    def pid(self) -> int | None:
        """The pid of this broker's running JVM; None (and no stale pid file) otherwise."""
        pid = read_pid(self.pid_file)
        if pid is None:
            return None
        if process_runs(pid, str(self.props)):
            return pid
        self.pid_file.unlink(missing_ok=True)
        return None

    def serving(self) -> bool:
        return self.pid() is not None and port_answers(self.client_port)


@dataclass(frozen=True)
class Cluster:
    """The KRaft cluster: its id and how many brokers (all of them also controllers)."""

    cluster_id: str
    size: int
    proxied: bool = False
    """Brokers have the PROXIED listener (for Toxiproxy)."""

    @property
    def brokers(self) -> list[Broker]:
        return [Broker(i) for i in range(1, self.size + 1)]

    @property
    def replication_factor(self) -> int:
        return min(self.size, 3)

    @property
    def bootstrap(self) -> str:
        return ",".join(f"{LOOPBACK}:{b.client_port}" for b in self.brokers)

    @property
    def proxy_bootstrap(self) -> str:
        """Bootstrap servers through Toxiproxy (meaningful when `proxied`)."""
        return ",".join(f"{LOOPBACK}:{b.proxy_front_port}" for b in self.brokers)

    def broker(self, broker_id: int) -> Broker:
        if not 1 <= broker_id <= self.size:
            raise StackError(f"no broker {broker_id}: the cluster has brokers 1..{self.size}")
        return Broker(broker_id)


def load_cluster() -> Cluster | None:
    try:
        data = json.loads(CLUSTER_FILE.read_text())
        return Cluster(cluster_id=str(data["cluster_id"]), size=int(data["brokers"]),
                       proxied=bool(data.get("proxied", False)))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise StackError(f"{CLUSTER_FILE} is damaged ({exc}); run `scripts/stack reset`") from exc


def planned_cluster() -> Cluster:
    """The configured cluster, or the default single broker when none was made yet."""
    return load_cluster() or Cluster(cluster_id="", size=1)


def _random_cluster_id() -> str:
    """A Kafka Uuid as `StorageTool random-uuid` prints it, without starting a JVM."""
    while True:
        text = urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text


def _save_cluster(cluster: Cluster) -> None:
    KAFKA_DIR.mkdir(parents=True, exist_ok=True)
    data: dict[str, object] = {"cluster_id": cluster.cluster_id, "brokers": cluster.size}
    if cluster.proxied:
        data["proxied"] = True
    CLUSTER_FILE.write_text(json.dumps(data))


def obtain_cluster(size: int, proxied: bool = False) -> Cluster:
    """The existing cluster (which must have `size` brokers) or a new one.

    `proxied` adds the PROXIED listener (kept from then on); a running broker that
    lacks it must be stopped first, since its listeners are fixed while it runs.
    """
    cluster = load_cluster()
    if cluster is None:
        cluster = Cluster(cluster_id=_random_cluster_id(), size=size, proxied=proxied)
        _save_cluster(cluster)
    elif cluster.size != size:
        raise StackError(
            f"the stack's Kafka cluster has {cluster.size} broker(s), not {size}; "
            f"run `scripts/stack reset` first to rebuild it with {size}"
        )
    elif proxied and not cluster.proxied:
        running = [b.id for b in cluster.brokers if b.pid() is not None]
        if running:
            raise StackError(
                f"Kafka brokers {running} run without the PROXIED listener Toxiproxy needs; "
                "run `scripts/stack down` first, then `scripts/stack up --toxiproxy`"
            )
        cluster = Cluster(cluster.cluster_id, cluster.size, proxied=True)
        _save_cluster(cluster)
    return cluster


# --- configuring and starting ---------------------------------------------------------------


def server_properties(cluster: Cluster, broker: Broker) -> str:
    voters = ",".join(f"{b.id}@{LOOPBACK}:{b.controller_port}" for b in cluster.brokers)
    min_isr = 1 if cluster.size == 1 else 2
    rf = cluster.replication_factor
    listeners = (f"PLAINTEXT://{LOOPBACK}:{broker.client_port},"
                 f"CONTROLLER://{LOOPBACK}:{broker.controller_port}")
    advertised = f"PLAINTEXT://{LOOPBACK}:{broker.client_port}"
    protocols = "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"
    if cluster.proxied:
        # Clients that connect to the PROXIED listener (through Toxiproxy) are told the
        # PROXIED addresses of every broker: Toxiproxy's front ports.
        listeners += f",PROXIED://{LOOPBACK}:{broker.proxied_port}"
        advertised += f",PROXIED://{LOOPBACK}:{broker.proxy_front_port}"
        protocols += ",PROXIED:PLAINTEXT"
    settings = {
        "process.roles": "broker,controller",
        "node.id": broker.id,
        "controller.quorum.voters": voters,
        "listeners": listeners,
        "advertised.listeners": advertised,
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": protocols,
        "log.dirs": broker.data_dir,
        "num.partitions": 1,
        "default.replication.factor": rf,
        "offsets.topic.replication.factor": rf,
        "transaction.state.log.replication.factor": rf,
        "transaction.state.log.min.isr": min_isr,
        "share.coordinator.state.topic.replication.factor": rf,
        "share.coordinator.state.topic.min.isr": min_isr,
        "group.initial.rebalance.delay.ms": 0,
        "auto.create.topics.enable": "false",
        # A broker restarted after SIGKILL cannot register until the controller has dropped
        # its old session: 3 s instead of the default 9 s makes fault-injection tests faster.
        "broker.heartbeat.interval.ms": 500,
        "broker.session.timeout.ms": 3000,
        "transaction.abort.timed.out.transaction.cleanup.interval.ms": 1000,
        "transaction.remove.expired.transaction.cleanup.interval.ms": 60000,
    }
    lines = [f"{key}={value}" for key, value in settings.items()]
    header = "# Written by scripts/stack on every start; edit scripts/stacklib/kafka.py instead."
    return "\n".join([header, *lines]) + "\n"


def _jvm_command(java: str, libs: Path, cluster: Cluster, main: str, *args: str) -> list[str]:
    heap = "1g" if cluster.size == 1 else "512m"
    return [
        java, "-Xms256m", f"-Xmx{heap}", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
        "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={LOG4J_FILE}", "-cp", f"{libs}/*", main, *args,
    ]


def _format_storage(java: str, libs: Path, cluster: Cluster, broker: Broker) -> None:
    if (broker.data_dir / "meta.properties").exists():
        return
    say(f"formatting storage of Kafka broker {broker.id} (cluster id {cluster.cluster_id})")
    cmd = _jvm_command(java, libs, cluster, "kafka.tools.StorageTool", "format",
                       "-t", cluster.cluster_id, "-c", str(broker.props))
    run_logged(cmd, broker.dir / "format.log", f"formatting Kafka broker {broker.id} storage")


def start_broker(java: str, libs: Path, cluster: Cluster, broker: Broker) -> None:
    """Start one broker detached (its own session), unless it already runs."""
    if broker.pid() is not None:
        return
    ensure_port_free(broker.client_port, f"Kafka broker {broker.id}")
    ensure_port_free(broker.controller_port, f"Kafka controller {broker.id}")
    if cluster.proxied:
        ensure_port_free(broker.proxied_port, f"Kafka broker {broker.id} (PROXIED listener)")
    broker.dir.mkdir(parents=True, exist_ok=True)
    LOG4J_FILE.write_text(LOG4J_YAML)
    broker.props.write_text(server_properties(cluster, broker))
    _format_storage(java, libs, cluster, broker)
    cmd = _jvm_command(java, libs, cluster, "kafka.Kafka", str(broker.props))
    with broker.log_file.open("ab") as log:
        log.write(f"\n===== scripts/stack starts broker {broker.id} at {time.ctime()}\n".encode())
        log.flush()
        process = subprocess.Popen(
            cmd, cwd=broker.dir, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
    broker.pid_file.write_text(f"{process.pid}\n")
    say(f"started Kafka broker {broker.id} (pid {process.pid}, log {broker.log_file})")


def _probe(cluster: Cluster, brokers: list[Broker], timeout: float) -> tuple[bool, str]:
    """Run the readiness probe with the .venv interpreter: `brokers` are live in the
    cluster metadata and a transactional producer commits."""
    cmd = [str(VENV_PYTHON), str(PROBE), "--bootstrap", cluster.bootstrap,
           "--timeout", f"{timeout:.0f}", "--replication-factor", str(cluster.replication_factor),
           "--broker-ids", ",".join(str(b.id) for b in brokers)]
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout + 10, check=False
        )
    except subprocess.TimeoutExpired:
        return False, f"probe timed out after {timeout:.0f} s"
    lines = (done.stdout.strip() or done.stderr.strip()).splitlines()
    if done.returncode == 2:
        raise StackError(f"the Kafka readiness probe cannot run: {' '.join(lines[-1:])}")
    return done.returncode == 0, (lines[-1] if lines else f"probe exit {done.returncode}")


def wait_ready(cluster: Cluster, brokers: list[Broker]) -> None:
    """Wait until `brokers` run and serve and a transactional producer can commit."""
    started = time.monotonic()
    deadline = started + READY_TIMEOUT
    last, reported = "ports not open yet", ""
    while True:
        for broker in brokers:
            if broker.pid() is None:
                raise StackError(
                    f"Kafka broker {broker.id} exited while starting; last lines of "
                    f"{broker.log_file}:\n{tail(broker.log_file)}"
                )
        remaining = deadline - time.monotonic()
        if all(port_answers(b.client_port) for b in brokers):
            ok, last = _probe(cluster, brokers, max(5.0, min(PROBE_TIMEOUT, remaining)))
            if ok:
                say(f"Kafka is ready (a transactional commit worked) after "
                    f"{time.monotonic() - started:.1f} s")
                return
            if last != reported:
                say(f"waiting for Kafka: {last}")
                reported = last
        if time.monotonic() > deadline:
            logs = ", ".join(str(b.log_file) for b in brokers)
            raise StackError(
                f"Kafka did not become ready within {READY_TIMEOUT:.0f} s (last probe: {last}); "
                f"logs: {logs}; last lines of broker {brokers[0].id}:\n"
                f"{tail(brokers[0].log_file)}"
            )
        time.sleep(0.5)


# --- stopping -------------------------------------------------------------------------------


def stop_brokers(brokers: list[Broker]) -> None:
    """SIGTERM every running broker, then SIGKILL those still running after a timeout."""
    running = [(b, pid) for b in brokers if (pid := b.pid()) is not None]
    for broker, pid in running:
        say(f"stopping Kafka broker {broker.id} (pid {pid})")
        os.kill(pid, signal.SIGTERM)
    for broker, pid in running:
        if not wait_for_exit(pid, STOP_TIMEOUT):
            say(f"Kafka broker {broker.id} ignored SIGTERM for {STOP_TIMEOUT:.0f} s; SIGKILL")
            os.kill(pid, signal.SIGKILL)
            wait_for_exit(pid, 10)
        broker.pid_file.unlink(missing_ok=True)


def kill_broker(broker: Broker) -> None:
    """SIGKILL one broker (fault injection): no clean shutdown at all."""
    pid = broker.pid()
    if pid is None:
        raise StackError(f"Kafka broker {broker.id} is not running")
    os.kill(pid, signal.SIGKILL)
    if not wait_for_exit(pid, 10):
        raise StackError(f"Kafka broker {broker.id} (pid {pid}) survived SIGKILL for 10 s")
    broker.pid_file.unlink(missing_ok=True)
    say(f"killed Kafka broker {broker.id} (pid {pid}) with SIGKILL")


def known_brokers() -> list[Broker]:
    """Every broker with a folder under .stack/kafka, whatever cluster.json says."""
    ids = {int(d.name.split("-", 1)[1]) for d in KAFKA_DIR.glob("broker-*") if d.name[7:].isdigit()}
    return [Broker(i) for i in sorted(ids)]


def status_lines(cluster: Cluster) -> tuple[bool, list[str]]:
    lines, all_up = [], True
    for b in cluster.brokers:
        pid = b.pid()
        up = pid is not None and port_answers(b.client_port)
        all_up &= up
        state = f"running, pid {pid}" if up else (f"NOT SERVING, pid {pid}" if pid else "stopped")
        proxied = (f", proxied {LOOPBACK}:{b.proxied_port} (via Toxiproxy "
                   f"{LOOPBACK}:{b.proxy_front_port})" if cluster.proxied else "")
        lines.append(
            f"kafka broker {b.id}: {state}; client {LOOPBACK}:{b.client_port}, controller "
            f"{LOOPBACK}:{b.controller_port}{proxied}; log {b.log_file}"
        )
    return all_up, lines
