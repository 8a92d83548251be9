"""Every configuration value is checked when the object is made, with a clear error
(a ConfigurationError, which is also a ValueError)."""

from __future__ import annotations

from typing import Any

import pytest

from coordinator import ConfigurationError, CoordinatorConfig, GroupCommit


@pytest.mark.parametrize(
    "kwargs",
    [{"max_batch": 0}, {"max_batch": -1}, {"max_batch": 1.5}, {"max_wait": -0.001},
     {"max_wait": float("nan")}, {"max_wait": 3600}],
)
def test_group_commit_rejects(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        GroupCommit(**kwargs)


def test_group_commit_accepts_edges() -> None:
    GroupCommit(max_batch=1, max_wait=0)
    GroupCommit(max_batch=10_000, max_wait=1.5)


@pytest.mark.parametrize(
    "kwargs",
    [{"producers": 0}, {"producers": 1001}, {"transaction_timeout_ms": 999},
     {"kafka_timeout": 0}, {"kafka_timeout": -1}, {"startup_timeout": float("nan")},
     {"connection_timeout": 0}, {"pool_min_size": 5, "pool_max_size": 2},
     {"pool_max_size": 0, "pool_min_size": 0}, {"idempotency_wait_ms": 0},
     {"idempotency_table": ""}, {"decision_log_table": ""}, {"max_clock_skew_seconds": 0},
     {"group_commit": "yes"}, {"producer_overrides": {"transactional.id": "x"}}],
)
def test_coordinator_config_rejects(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError) as info:
        CoordinatorConfig(**kwargs)
    assert isinstance(info.value, ValueError)


def test_coordinator_config_defaults_are_valid() -> None:
    cfg = CoordinatorConfig()
    assert cfg.group_commit is None and cfg.producers >= 1
    CoordinatorConfig(group_commit=GroupCommit(), max_clock_skew_seconds=None)
