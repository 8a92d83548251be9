"""The recovery command during and after the campaign: periodic runs (a CronJob), runs
killed at random, the recovery storm (grace 0, back to back), operators' mistakes (a wrong
decision topic, another Kafka cluster), and the final runs until it exits 0.

Every run's exit status and JSON report go to ``recovery.jsonl``; the gids it committed
or rolled back are collected in :attr:`Recoveries.resolved` (the table's "by recovery").
"""

from __future__ import annotations

import json
import random
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from .report import Journal
from .settings import NAME, PYTHON, ROOT, CampaignError, Settings
from .stack import Services

__all__ = ["Recoveries"]


class Recoveries:
    def __init__(self, s: Settings, services: Services, decision_topic: str, out: Path,
                 journal: Journal) -> None:
        self.s = s
        self.services = services
        self.decision_topic = decision_topic
        self.journal = journal
        self.resolved: set[str] = set()
        """gids the recovery command (or a worker's recover_own) committed or rolled back."""
        self.storm_runs: Counter[str] = Counter()
        """phase -> storm runs."""
        self.wrong_decision_topic: str | None = None
        self.second_bootstrap: str | None = None
        """The operator-mistake fault's wrong decision topic and second Kafka cluster."""
        self._lock = threading.Lock()
        self._log = (out / "recovery.jsonl").open("a", encoding="utf-8")

    def recover_once(self, grace: float, kill_after: float | None = None, *,
                     bootstrap: str | None = None, decision_topic: str | None = None,
                     label: str = "normal") -> tuple[int, dict[str, Any] | None]:
        """One run of the recovery command; ``kill_after``: SIGKILL it after that many
        seconds if it still runs (a fault of its own). ``bootstrap`` and
        ``decision_topic`` override the right ones (an operator's mistake)."""
        cmd = [PYTHON, "-m", "recovery", "--postgres", self.services.dsn,
               "--bootstrap-servers", bootstrap or self.services.bootstrap, "--name", NAME,
               "--decision-topic", decision_topic or self.decision_topic,
               "--grace-seconds", str(grace), "--json", "--log-level", "WARNING"]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            stdout, stderr = proc.communicate(timeout=kill_after if kill_after else 300)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            if kill_after:
                self.journal.event("kill-recovery", after_seconds=round(kill_after, 3))
                self._record(-9, None, f"killed after {kill_after:.3f} s", label)
            else:
                self._record(-1, None, "timed out after 300 s", label)
            return -1, None
        report: dict[str, Any] | None = None
        try:
            report = json.loads(stdout.strip().splitlines()[-1]) if stdout.strip() else None
        except ValueError:
            report = None
        if report is not None:
            with self._lock:
                self.resolved.update(report.get("committed", []))
                self.resolved.update(report.get("rolled_back", []))
        self._record(proc.returncode, report, stderr[-2000:], label)
        return proc.returncode, report

    def _record(self, rc: int, report: dict[str, Any] | None, stderr: str,
                label: str = "normal") -> None:
        with self._lock:
            self._log.write(json.dumps({"t": time.time(), "phase": self.journal.phase,
                                        "kind": label, "exit": rc, "report": report,
                                        "stderr": stderr if rc not in (0, 1) else ""})
                            + "\n")
            self._log.flush()

    def recovery_loop(self, stop: threading.Event) -> None:
        """The recovery command every few seconds, like a CronJob. During the random-kill
        and mixed phases half of its runs are killed with SIGKILL at a random moment."""
        rng = random.Random(f"{self.s.seed}/recovery")
        while not stop.wait(self.s.recovery_interval):
            kill_after = None
            if self.journal.phase in ("kill-random", "mixed", "pipeline-mixed") \
                    and rng.random() < 0.5:
                kill_after = rng.uniform(0.2, 1.5)
            self.recover_once(self.s.grace_seconds, kill_after)

    def storm_loop(self, stop: threading.Event) -> None:
        """The recovery command with the storm's grace period (0), back to back."""
        phase = self.journal.phase
        while not stop.is_set():
            self.recover_once(self.s.storm_grace, label="storm")
            self.storm_runs[phase] += 1
            stop.wait(0.05)

    def mistake_loop(self, stop: threading.Event, idx: int) -> None:
        """Operator mistakes between the normal runs: recovery (grace 0) with a wrong
        decision topic -- existing and empty -- or against another Kafka cluster."""
        rng = random.Random(f"{self.s.seed}/{idx}/mistakes")
        mistakes = ["wrong-topic", "wrong-cluster"]
        n = 0
        while not stop.wait(rng.uniform(0.5, 2.5)):
            mistake = mistakes[n % 2]
            n += 1
            if mistake == "wrong-topic":
                rc, report = self.recover_once(0.0, decision_topic=self.wrong_decision_topic,
                                               label=mistake)
            else:
                rc, report = self.recover_once(0.0, bootstrap=self.second_bootstrap,
                                               label=mistake)
            self.journal.event("operator-mistake", mistake=mistake, exit=rc, report=report)

    def final_recovery(self) -> int:
        """Recovery until it exits 0 with nothing waiting in the grace period."""
        deadline = time.monotonic() + 600
        runs = 0
        while True:
            rc, report = self.recover_once(self.s.grace_seconds)
            runs += 1
            if rc == 0 and report is not None and not report.get("waiting"):
                return runs
            if time.monotonic() > deadline:
                raise CampaignError(f"recovery did not exit 0 within 600 s (last exit {rc}, "
                                    f"report {report})")
            time.sleep(2.0)

    def close(self) -> None:
        self._log.close()
