"""The pipeline workload: input messages -> consumer stages under the coordinator -> the
checker (``tests/faults/pipecheck.py``).

A pipeline phase gets its own input topic (``PARTITIONS`` partitions) and consumer group;
the table ``pipeline`` and the output topic are shared by the run's pipeline phases. The
campaign's *feeder* (a thread of the campaign, connected directly, an idempotent producer)
produces the phase's input messages -- key = the input id, round-robin over the partitions
-- in bursts of 1-8 spread over ``--phase-seconds``, while ``--stages`` stage processes
(``tests/faults/stage.py``, instances ``stage0``, ``stage1``..., the same group, each its
own coordinator, connected through Toxiproxy) consume them; the campaign supervises and
restarts them like the workload's clients. The phase is over when every input is
delivered and the group's committed offsets (read with ``isolation.level=read_committed``,
so pending transactional offsets are waited for) have reached the end of the input on
every partition; then the stages get SIGTERM and leave the group.
"""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from psycopg import sql

from tests.plugins.kafka_helpers import create_topic

from .plans import plan_arms
from .report import say
from .settings import NAME, PYTHON, CampaignError, Settings
from .stack import Services

__all__ = ["PARTITIONS", "STAGE_PREFIX", "TABLE", "Pipeline", "PipelinePhase", "is_stage_gid"]

PARTITIONS = 6
TABLE = "pipeline"
STAGE_PREFIX = "stage"


def is_stage_gid(gid: str) -> bool:
    """Whether ``gid`` is a transaction of a pipeline stage (instance ``stage<k>``)."""
    parts = gid.split(":")
    return len(parts) > 2 and parts[2].startswith(STAGE_PREFIX)


class Pipeline:
    """The run's pipeline: its table, output topic and phases."""

    def __init__(self, s: Settings, services: Services, run_id: str,
                 decision_topic: str) -> None:
        self.s = s
        self.services = services
        self.run_id = run_id
        self.decision_topic = decision_topic
        self.sink = f"faults.{run_id}.pipeline-out"
        self.rf = 3 if s.brokers >= 3 else 1
        self.phases: list[PipelinePhase] = []
        with psycopg.connect(services.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL(
                "CREATE TABLE {} (id bigserial PRIMARY KEY, phase int NOT NULL, part int NOT "
                "NULL, off bigint NOT NULL, in_id text NOT NULL, tx text NOT NULL, instance "
                "text NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())"
            ).format(sql.Identifier(TABLE)))
        create_topic(services.bootstrap, self.sink, partitions=3, replication_factor=self.rf,
                     config=self._topic_config())

    def _topic_config(self) -> dict[str, str]:
        return {"min.insync.replicas": "2"} if self.rf >= 3 else {}

    def phase(self, idx: int, kind: str, inputs: list[dict[str, Any]],
              pdir: Path) -> PipelinePhase:
        source = f"faults.{self.run_id}.in{idx:02d}"
        create_topic(self.services.bootstrap, source, partitions=PARTITIONS,
                     replication_factor=self.rf, config=self._topic_config())
        ph = PipelinePhase(self, idx, kind, [str(o["op"]) for o in inputs], source, pdir)
        self.phases.append(ph)
        return ph


class PipelinePhase:
    """One pipeline phase: its input, its stages' plans and commands, the feeder, and when
    it is over."""

    def __init__(self, pipe: Pipeline, idx: int, kind: str, inputs: list[str], source: str,
                 pdir: Path) -> None:
        self.pipe = pipe
        self.idx = idx
        self.kind = kind
        self.inputs = inputs
        self.source = source
        self.group = f"faults-{pipe.run_id}-g{idx:02d}"
        self.pdir = pdir
        s = pipe.s
        self.arms = plan_arms(s, kind, idx, random.Random(f"{s.seed}/{idx}/{kind}/arms"))
        self.end: dict[int, int] = {}
        """partition -> next offset after the last input delivered there."""
        self.feeder_errors: list[str] = []
        self.fed = threading.Event()
        self.stop = threading.Event()
        self._feeder: threading.Thread | None = None
        self._offsets: Consumer | None = None
        self._next_check = 0.0
        self.next_probe = 0.0
        """When the campaign's liveness probe looks at the stages again."""
        self.committed: dict[int, int] = {}

    # -- the stages --------------------------------------------------------------------

    def stage_plans(self) -> list[tuple[str, Path, Path, Path]]:
        """(instance, plan, log, stderr) of every stage; the plans are written."""
        out = []
        for instance, arms in self.arms.items():
            plan = self.pdir / f"plan-{instance}.json"
            plan.write_text(json.dumps({"arms": arms}, indent=1))
            out.append((instance, plan, self.pdir / f"log-{instance}.jsonl",
                        self.pdir / f"stderr-{instance}.log"))
        return out

    def command(self, instance: str, plan: Path, log: Path, recover_own: bool) -> list[str]:
        services = self.pipe.services
        cmd = [PYTHON, "-m", "tests.faults.stage", "--plan", str(plan), "--log", str(log),
               "--postgres", services.proxy_dsn, "--bootstrap", services.proxy_bootstrap,
               "--name", NAME, "--instance", instance, "--group", self.group, "--source",
               self.source, "--sink", self.pipe.sink, "--table", TABLE, "--decision-topic",
               self.pipe.decision_topic, "--phase", str(self.idx),
               "--driver", self.pipe.s.driver]
        if recover_own:
            cmd.append("--recover-own")
        return cmd

    # -- the feeder --------------------------------------------------------------------

    def start_feeder(self) -> None:
        self._feeder = threading.Thread(target=self._feed, daemon=True,
                                        name=f"feeder-{self.idx}")
        self._feeder.start()

    def _feed(self) -> None:
        rng = random.Random(f"{self.pipe.s.seed}/{self.idx}/feeder")
        producer = Producer({"bootstrap.servers": self.pipe.services.bootstrap,
                             "enable.idempotence": True, "acks": "all", "linger.ms": 5,
                             "message.timeout.ms": 300_000})
        lock = threading.Lock()

        def delivered(err: KafkaError | None, msg: Message) -> None:
            with lock:
                if err is not None:
                    self.feeder_errors.append(f"{(msg.key() or b'').decode()}: {err.str()}")
                    return
                p, o = int(msg.partition() or 0), int(msg.offset() or 0)
                self.end[p] = max(self.end.get(p, 0), o + 1)

        try:
            n, i = len(self.inputs), 0
            while i < n and not self.stop.is_set():
                burst = min(n - i, rng.randint(1, 8))
                for j in range(i, i + burst):
                    key = self.inputs[j]
                    producer.produce(self.source, key=key,
                                     value=json.dumps({"in": key}).encode(),
                                     partition=j % PARTITIONS, on_delivery=delivered)
                i += burst
                producer.poll(0)
                self.stop.wait(self.pipe.s.phase_seconds * burst / n)
            left = producer.flush(300)
            if left:
                self.feeder_errors.append(f"{left} input message(s) not delivered in 300 s")
        except (KafkaException, BufferError) as exc:
            self.feeder_errors.append(f"feeder: {exc}")
        finally:
            self.fed.set()
        if self.feeder_errors:
            say(f"pipeline feeder of phase {self.idx}: {len(self.feeder_errors)} error(s): "
                f"{self.feeder_errors[:3]}")

    # -- the end of the phase ----------------------------------------------------------

    def finished(self) -> bool:
        """Every input delivered and the group's committed offsets at the end of the input
        (checked once a second)."""
        if not self.fed.is_set() or time.monotonic() < self._next_check:
            return False
        self._next_check = time.monotonic() + 1.0
        if self.feeder_errors:
            raise CampaignError(f"the pipeline's feeder failed: {self.feeder_errors[:3]}")
        committed = self.read_committed_offsets()
        if committed is None:
            return False
        self.committed = committed
        return all(committed.get(p, -1) >= end for p, end in self.end.items())

    def read_committed_offsets(self) -> dict[int, int] | None:
        """The group's committed offsets of the input topic (None: not readable now)."""
        if self._offsets is None:
            self._offsets = Consumer({
                "bootstrap.servers": self.pipe.services.bootstrap, "group.id": self.group,
                "enable.auto.commit": False, "isolation.level": "read_committed"})
        try:
            tps = self._offsets.committed(
                [TopicPartition(self.source, p) for p in range(PARTITIONS)], timeout=5)
        except KafkaException:
            return None
        return {tp.partition: tp.offset for tp in tps}

    def close(self) -> None:
        self.stop.set()
        if self._feeder is not None:
            self._feeder.join(30)
        if self._offsets is not None:
            self._offsets.close()
            self._offsets = None

    def info(self) -> dict[str, Any]:
        return {"source": self.source, "group": self.group, "inputs": len(self.inputs),
                "delivered": sum(self.end.values()), "feeder_errors": self.feeder_errors[:10],
                "end": self.end, "committed": self.committed,
                "arms": sum(len(a) for a in self.arms.values())}
