"""Real crashes of a coordinator process, for the recovery tests and fault campaigns.

``worker`` is a coordinator process that kills itself at a chosen protocol point;
``checker`` compares PostgreSQL, the read_committed Kafka view and the decision log;
``indoubt`` makes in-doubt transactions in-process (fast, for many of them).
"""
