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
``aio_mode``    the ``--asyncio`` mode: (h) ``AsyncCoordinator`` with group commit vs (i)
                async naive dual-write, asyncio tasks on one event loop
``aio_paths``   its two paths; ``aio_loop`` its closed loop of tasks (and the loop's lag)
``aio_producer``    the ``--aio-producer`` mode: a Kafka transaction from asyncio through
                ``confluent_kafka.aio.AIOProducer`` vs the blocking producer in worker
                threads, and a check of AIOProducer's transactional API

``python -m tests.bench.recovery``: one recovery run over 10,000 in-doubt transactions,
on a throw-away PostgreSQL cluster (``pgcluster``).

``python -m tests.bench.aio_profile``: where an operation of the asyncio coordinator goes
(phases, CPU of the event-loop thread), next to the synchronous coordinator's.
"""
