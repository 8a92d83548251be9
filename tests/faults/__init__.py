"""The crash-and-fault campaign: ``scripts/faults`` (``python -m tests.faults``).

* :mod:`tests.faults.campaign` -- the run itself: options, phases in order, final recovery,
  check, summary; ``main``;
* :mod:`tests.faults.settings` -- fault kinds, protocol points, the run's settings;
* :mod:`tests.faults.plans` -- each phase's operations and the faults armed in them;
* :mod:`tests.faults.stack` -- stack control: the campaign's own stack instances, its data,
  healing, libfaketime;
* :mod:`tests.faults.supervise` -- process supervision: client processes started, watched
  and restarted; the phases' injectors;
* :mod:`tests.faults.recoveries` -- the recovery command: periodic, storm, operator
  mistakes, final runs;
* :mod:`tests.faults.report` -- progress lines, the fault journal, the tables, the summary;
* :mod:`tests.faults.workload` -- a client process running business operations through a
  coordinator, killing itself at protocol points (the hooks of ``tests/crash/worker.py``,
  per thread, in :mod:`tests.faults.hooks`); :mod:`tests.faults.operations` -- its
  operations' attempts and answers, and resuming after a kill;
* :mod:`tests.faults.injectors` -- the faults: random kills, Kafka broker kill -9 and restart,
  PostgreSQL immediate stop and restart, network cuts and latency through Toxiproxy;
* :mod:`tests.faults.check` -- the invariant checker, operation by operation, on what
  :mod:`tests.faults.observed` reads from the clients' logs and the two systems;
* the pipeline workload (phases ``pipeline``, ``pipeline-mixed``): :mod:`tests.faults.pipeline`
  -- its topics, table, input feeder and the end of a phase; :mod:`tests.faults.stage` -- a
  consumer stage process (``Coordinator.run_consumer``) killing, freezing or failing itself
  at protocol points; :mod:`tests.faults.pipecheck` -- its checker (each input message:
  exactly one row and one output message, committed offsets at the end of the input), on
  what :mod:`tests.faults.stagelogs` reads from the stages' logs;
* :mod:`tests.faults.logtail` -- what the campaign reads from the logs of running clients
  (in an attempt, started, ended, a stage stuck: the liveness probe).
"""
