"""Every error of the tree survives pickling (multiprocessing, process pools, task
queues) with its class, message, gid, phase and its own attributes."""

from __future__ import annotations

import pickle
from typing import Any

import pytest

import coordinator
import recovery
from coordinator import Error, Phase


def every_error_class() -> list[type[Error]]:
    found: list[type[Error]] = []
    for module in (coordinator, recovery):
        for name in module.__all__:
            obj = getattr(module, name)
            if isinstance(obj, type) and issubclass(obj, Error):
                found.append(obj)
    return found


EXTRA: dict[str, dict[str, Any]] = {
    "AlreadyCommitted": {"idempotency_key": "k", "previous_gid": "g"},
    "IdempotencyKeyBusy": {"idempotency_key": "k"},
    "RolledBack": {"complete": False},
    "PrepareForbidden": {"complete": False},
    "Diverged": {"kafka_committed": False},
    "PoisonMessage": {"topic": "orders", "partition": 3, "offset": 17},
}


def test_the_tree_is_complete() -> None:
    names = {c.__name__ for c in every_error_class()}
    assert {"Error", "RolledBack", "AlreadyCommitted", "IdempotencyKeyBusy", "Diverged",
            "OutcomeUnknown", "RecoveryError", "ConfigurationError"} <= names


@pytest.mark.parametrize("cls", every_error_class(), ids=lambda c: c.__name__)
def test_round_trip(cls: type[Error]) -> None:
    extra = EXTRA.get(cls.__name__, {})
    kwargs: dict[str, Any] = {"phase": Phase.KAFKA_COMMIT, **extra}
    if cls.__name__ not in ("AlreadyCommitted", "IdempotencyKeyBusy"):
        kwargs["gid"] = "pk2pc2:g"
    err = cls("something failed", **kwargs)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls
    assert str(back) == str(err)
    assert back.args == err.args
    assert vars(back) == vars(err)
    assert isinstance(back, Error)
