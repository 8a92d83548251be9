"""The benchmarks (no ``test_*`` modules here: pytest collects nothing).

``python -m tests.bench`` (what ``scripts/bench`` runs): the coordinator against naive
dual-write and a transactional outbox, and ``--memory N``. Its modules:

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

``python -m tests.bench.recovery``: one recovery run over 10,000 in-doubt transactions,
on a throw-away PostgreSQL cluster (``pgcluster``).
"""
