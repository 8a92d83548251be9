"""The FastAPI example (examples/fastapi_app.py) driven over HTTP in-process: httpx's
ASGI transport, the app's lifespan run, the real PostgreSQL and Kafka underneath."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import httpx

from coordinator import Step
from examples.fastapi_app import Settings, create_app
from tests.integration.conftest import Env
from tests.plugins.kafka_helpers import create_topic, delete_topics


def settings(env: Env, topic: str, **overrides: Any) -> Settings:
    config = env.config(producers=1, idempotency_wait_ms=200, **overrides)
    return Settings(postgres=env.dsn, kafka=env.kafka, topic=topic, name=env.name,
                    instance=env.instance, config=config)


@asynccontextmanager
async def serving(app_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app started (its lifespan entered) and an HTTP client talking to it."""
    app = create_app(app_settings)
    transport = httpx.ASGITransport(app=app)
    async with (app.router.lifespan_context(app),
                httpx.AsyncClient(transport=transport, base_url="http://orders.test") as http):
        yield http


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(main())


async def post(http: httpx.AsyncClient, order: dict[str, int],
               key: str | None) -> httpx.Response:
    headers = {} if key is None else {"Idempotency-Key": key}
    return await http.post("/orders", json=order, headers=headers)


def test_order_commits_on_both_sides_and_a_retry_replays_it(env: Env) -> None:
    topic = env.topic()
    key = f"client-{uuid.uuid4().hex}"

    async def main() -> None:
        async with serving(settings(env, topic)) as http:
            first = await post(http, {"id": 1, "total": 10}, key)
            assert first.status_code == 201, first.text
            assert first.json() == {"id": 1, "total": 10}
            assert first.headers["location"] == "/orders/1"

            # The client lost the answer and retries: the first result, nothing redone.
            again = await post(http, {"id": 1, "total": 10}, key)
            assert again.status_code == 200, again.text
            assert again.json() == {"id": 1, "total": 10}
            assert again.headers["idempotent-replayed"] == "true"

            # The same key with another body; the same order with another key; no key.
            reused = await post(http, {"id": 1, "total": 11}, key)
            assert (reused.status_code, reused.json()["code"]) == (422,
                                                                    "idempotency_key_reused")
            taken = await post(http, {"id": 1, "total": 10}, "another-key")
            assert (taken.status_code, taken.json()["code"]) == (409, "order_exists")
            missing = await post(http, {"id": 2, "total": 5}, None)
            assert missing.status_code == 400

            got = await http.get("/orders/1")
            assert (got.status_code, got.json()) == (200, {"id": 1, "total": 10})
            assert (await http.get("/orders/2")).status_code == 404
            assert (await http.get(f"/orders/{2**31}")).status_code == 422  # not an int4

    run(main)
    assert env.execute("SELECT id, total, idempotency_key FROM orders") == [(1, 10, key)]
    records = env.read(topic)
    assert [(r.key, json.loads(r.value or b"")) for r in records] == [
        (b"1", {"id": 1, "total": 10})]
    assert ("type", b"order.created") in records[0].headers
    gid = env.idempotency_rows()[f"POST /orders:{key}"]
    assert gid is not None
    env.assert_decided(gid)  # the commit point: its decision record in the decision log
    assert env.prepared() == []


def test_missing_topic_is_503_nothing_done_and_the_retry_succeeds(env: Env) -> None:
    """A request the service cannot complete now: rolled back on both sides, 503 with
    Retry-After, and the same request (same key) goes through once it can."""
    topic = f"orders-not-yet-{env.name}"
    key = "retry-me"

    async def main() -> None:
        async with serving(settings(env, topic)) as http:
            refused = await post(http, {"id": 7, "total": 70}, key)
            assert refused.status_code == 503, refused.text
            assert refused.json()["code"] == "rolled_back"
            assert refused.headers["retry-after"] == "2"
            assert (await http.get("/orders/7")).status_code == 404

            await asyncio.to_thread(create_topic, env.bootstrap, topic)
            retried = await post(http, {"id": 7, "total": 70}, key)
            assert retried.status_code == 201, retried.text

    try:
        run(main)
        assert env.execute("SELECT id, total FROM orders") == [(7, 70)]
        assert [r.key for r in env.read(topic)] == [b"7"]
        assert env.prepared() == []
    finally:
        delete_topics(env.bootstrap, [topic])


def test_committed_pending_recovery_is_202_and_resolved_at_the_next_start(env: Env) -> None:
    """The process fails right after the commit point: the client gets 202 (accepted,
    being resolved); a retry meanwhile gets 409; the next start of the app (its
    lifespan runs arecover_own) commits the PostgreSQL side, and the retry replays."""
    topic = env.topic()
    key = "pending-1"

    def stop_after_commit_point(step: Step, gid: str | None) -> None:
        if step is Step.AFTER_KAFKA_COMMIT:
            raise RuntimeError("the process stops here")

    async def first_run() -> None:
        async with serving(settings(env, topic, on_step=stop_after_commit_point)) as http:
            accepted = await post(http, {"id": 3, "total": 30}, key)
            assert accepted.status_code == 202, accepted.text
            assert accepted.json()["code"] == "being_resolved"
            assert accepted.headers["location"] == "/orders/3"
            assert "retry-after" in accepted.headers
            assert (await http.get("/orders/3")).status_code == 404  # prepared, not visible
            busy = await post(http, {"id": 3, "total": 30}, key)
            assert (busy.status_code, busy.json()["code"]) == (409, "in_progress")

    async def second_run() -> None:
        async with serving(settings(env, topic)) as http:
            got = await http.get("/orders/3")
            assert (got.status_code, got.json()) == (200, {"id": 3, "total": 30})
            again = await post(http, {"id": 3, "total": 30}, key)
            assert again.status_code == 200, again.text
            assert again.headers["idempotent-replayed"] == "true"

    run(first_run)
    assert len(env.prepared()) == 1
    assert [r.key for r in env.read(topic)] == [b"3"]  # Kafka side committed
    run(second_run)
    assert env.prepared() == []
    assert env.execute("SELECT id, total FROM orders") == [(3, 30)]
    assert [r.key for r in env.read(topic)] == [b"3"]  # exactly once
