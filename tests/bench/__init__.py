"""The benchmarks (no ``test_*`` modules here: pytest collects nothing).

``python -m tests.bench`` (what ``scripts/bench`` runs): the coordinator against naive
dual-write and a transactional outbox, ``--memory N`` and ``--consume``. Its modules:

``env``         the services, the bench's tables and topics, pools, clean-up
``cpu``         CPU and memory accounting from /proc
``paths``       the workload paths: naive dual-write, 2PC per operation and with group
                commit, PostgreSQL alone
``outbox``      the transactional-outbox path, with its relay and consumer processes
``txn_count``   decision records per Kafka transaction, through ``producer_factory``
``loop``        the closed loop and one measurement
``report``      medians, tables, the ratio line, the plot
``throughput``  the main mode
``memory``      the ``--memory N`` mode
``consume``     the ``--consume`` mode: a consume-process-produce stage, exactly once
                (``run_consumer``) vs at least once vs an idempotent consumer
``consume_paths``   its three stages, and the laps that say where their time goes
``consume_report``  its tables and ratio line

``python -m tests.bench.recovery``: one recovery run over 10,000 in-doubt transactions,
on a throw-away PostgreSQL cluster (``pgcluster``).
"""
