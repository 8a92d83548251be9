"""The crash-and-fault campaign (issue 6): ``scripts/faults``.

* :mod:`tests.faults.workload` -- a client process running business operations through a
  coordinator, killing itself at protocol points (the hooks of ``tests/crash/worker.py``);
* :mod:`tests.faults.injectors` -- the faults: random kills, Kafka broker kill -9 and restart,
  PostgreSQL immediate stop and restart, network cuts and latency through Toxiproxy;
* :mod:`tests.faults.check` -- the invariant checker, operation by operation;
* :mod:`tests.faults.campaign` -- phases, supervision, recovery, the table
  (``python -m tests.faults``).
"""
