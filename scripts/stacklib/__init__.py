"""The local Kafka + PostgreSQL stack behind `scripts/stack` (Python standard library only)."""
