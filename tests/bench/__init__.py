"""Benchmarks (not collected by pytest: no ``test_*`` modules here).

``python -m tests.bench.recovery``: one recovery run over 10,000 in-doubt transactions.
"""
