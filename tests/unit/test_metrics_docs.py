"""The alerting rules (docs/alerts.yml) and the Grafana dashboard
(docs/grafana-dashboard.json) use only metrics the library publishes, and cover
what operators must watch.

The rules file is read with a few regular expressions (no YAML parser in the
test dependencies); the dashboard is JSON.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from coordinator.metrics import METRIC_NAMES as COORDINATOR_METRICS
from coordinator.metrics import PrometheusObserver
from recovery.metrics import METRIC_NAMES as RECOVERY_METRICS
from recovery.metrics import RecoveryMetrics

DOCS = Path(__file__).resolve().parents[2] / "docs"
_METRIC = re.compile(r"\bpk2pc_[a-z0-9_]+\b")


def _series_names() -> frozenset[str]:
    """Every series name the library's metric families expose, by their type."""
    registry = CollectorRegistry()
    PrometheusObserver(registry)
    RecoveryMetrics(registry)
    names: set[str] = set()
    families: set[str] = set()
    for family in registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
            families.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + s for s in ("_bucket", "_sum", "_count"))
            families.add(family.name)
        else:
            names.add(family.name)
            families.add(family.name)
    assert families == set(COORDINATOR_METRICS) | set(RECOVERY_METRICS)
    return frozenset(names)


SERIES = _series_names()


def unknown_metrics(text: str) -> set[str]:
    """Names of ``pk2pc_`` series in ``text`` that no METRIC_NAMES family exposes (a
    histogram has ``_bucket``, ``_sum`` and ``_count`` series, a counter ``_total``)."""
    return set(_METRIC.findall(text)) - SERIES


def test_the_checker_catches_unknown_names() -> None:
    assert unknown_metrics("rate(pk2pc_transactions_total[5m]) + pk2pc_phase_seconds_bucket"
                           " + pk2pc_in_doubt") == set()
    assert unknown_metrics("pk2pc_transactions + pk2pc_in_doubt_bucket + pk2pc_nope_total"
                           " + pk2pc_phase_seconds") == {
        "pk2pc_transactions", "pk2pc_in_doubt_bucket", "pk2pc_nope_total",
        "pk2pc_phase_seconds"}


# -- docs/alerts.yml ----------------------------------------------------------------


def alert_rules() -> dict[str, dict[str, str]]:
    """alert name -> {"expr": ..., "severity": ..., "block": the rule's text}."""
    text = (DOCS / "alerts.yml").read_text()
    assert re.search(r"^groups:\n  - name: \S+\n    rules:\n", text, re.MULTILINE)
    rules: dict[str, dict[str, str]] = {}
    for block in re.split(r"^      - (?=alert: )", text, flags=re.MULTILINE)[1:]:
        name = re.match(r"alert: (\w+)\n", block)
        expr = re.search(r"^        expr: (.+)$", block, re.MULTILINE)
        severity = re.search(r"^          severity: (\w+)$", block, re.MULTILINE)
        assert name and expr and severity, block
        assert re.search(r"^        annotations:\n          summary: ", block, re.MULTILINE)
        assert name[1] not in rules, f"two rules named {name[1]}"
        rules[name[1]] = {"expr": expr[1], "severity": severity[1], "block": block}
    return rules


def balanced(expr: str) -> bool:
    depth: list[str] = []
    pairs = {")": "(", "]": "[", "}": "{"}
    for ch in re.sub(r'"[^"]*"', '""', expr):
        if ch in "([{":
            depth.append(ch)
        elif ch in pairs and (not depth or depth.pop() != pairs[ch]):
            return False
    return not depth


def test_alert_rules_use_published_metrics() -> None:
    rules = alert_rules()
    assert len(rules) >= 3
    for name, rule in rules.items():
        assert _METRIC.search(rule["expr"]), name
        assert balanced(rule["expr"]), name
        assert rule["severity"] in ("warning", "page"), name
    assert unknown_metrics((DOCS / "alerts.yml").read_text()) == set()


@pytest.mark.parametrize(
    "watched",
    [
        r"pk2pc_in_doubt_oldest_age_seconds\b.*> \d+",
        r"time\(\) - .*pk2pc_recovery_last_success_timestamp_seconds\b.*> \d+",
        r'pk2pc_transactions_total\{status="in_doubt"\}',
    ],
    ids=["in-doubt-age", "recovery-not-run", "outcome-unknown"],
)
def test_alert_rules_cover(watched: str) -> None:
    assert any(re.search(watched, r["expr"]) for r in alert_rules().values())


def test_every_alert_is_explained_in_the_runbook() -> None:
    runbook = (DOCS / "operations.md").read_text()
    for name in alert_rules():
        assert f"`{name}`" in runbook, f"{name} is not explained in docs/operations.md"


# -- docs/grafana-dashboard.json ---------------------------------------------------------


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((DOCS / "grafana-dashboard.json").read_text())
    return loaded


def test_dashboard_uses_published_metrics() -> None:
    dash = dashboard()
    panels = dash["panels"]
    assert panels and len({p["id"] for p in panels}) == len(panels)
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    assert all(exprs) and all(balanced(e) for e in exprs)
    variables = [v["definition"] for v in dash["templating"]["list"]]
    for text in [*exprs, *variables]:
        assert unknown_metrics(text) == set(), text
    used = {m for e in exprs for m in _METRIC.findall(e)}
    for needed in ["pk2pc_transactions_total", "pk2pc_phase_seconds_bucket", "pk2pc_in_doubt",
                   "pk2pc_in_doubt_oldest_age_seconds",
                   "pk2pc_recovery_last_success_timestamp_seconds"]:
        assert needed in used, f"the dashboard does not show {needed}"
    quantiles = {q for e in exprs for q in re.findall(r"histogram_quantile\((0\.\d+),", e)}
    assert {"0.5", "0.99"} <= quantiles
