"""Kafka readiness probe used by scripts/stack: a transactional producer must commit.

Runs with the project's .venv interpreter (it needs confluent_kafka). Exit status: 0 ready,
1 not ready yet (the reason is the last line of stdout), 2 confluent_kafka is missing.
"""

from __future__ import annotations

import argparse
import sys

PROBE_TOPIC = "stack-readiness-probe"
TRANSACTIONAL_ID = "stack-readiness-probe"


def _ensure_topic(bootstrap: str, replication_factor: int, timeout: float) -> None:
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    topic = NewTopic(PROBE_TOPIC, num_partitions=1, replication_factor=replication_factor)
    future = admin.create_topics([topic], request_timeout=timeout)[PROBE_TOPIC]
    try:
        future.result(timeout=timeout)
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise


def _check_brokers(bootstrap: str, broker_ids: list[int], timeout: float) -> None:
    """The cluster metadata must list these brokers (registered and not fenced)."""
    from confluent_kafka.admin import AdminClient

    listed = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=timeout).brokers
    missing = sorted(set(broker_ids) - set(listed))
    if missing:
        raise RuntimeError(f"brokers {missing} not in the cluster metadata yet")


def _commit_one(bootstrap: str, timeout: float) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "transactional.id": TRANSACTIONAL_ID})
    producer.init_transactions(timeout)
    producer.begin_transaction()
    producer.produce(PROBE_TOPIC, value=b"ready")
    producer.commit_transaction(timeout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--timeout", type=float, default=20.0)
    parser.add_argument("--replication-factor", type=int, default=1)
    parser.add_argument("--broker-ids", default="", help="comma-separated ids that must be live")
    args = parser.parse_args()
    try:
        import confluent_kafka  # noqa: F401
    except ImportError as exc:
        print(f"{exc}; reinstall .venv (`rm -rf .venv && scripts/stack up`)")
        return 2
    try:
        if args.broker_ids:
            _check_brokers(args.bootstrap, [int(i) for i in args.broker_ids.split(",")],
                           args.timeout)
        _ensure_topic(args.bootstrap, args.replication_factor, args.timeout)
        _commit_one(args.bootstrap, args.timeout)
    except Exception as exc:  # any failure just means "not ready yet"
        print(f"not ready: {type(exc).__name__}: {exc}")
        return 1
    print("ready: a transactional producer committed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
