"""Recovery worker: resolves in-doubt prepared transactions from the decision log."""

__all__: list[str] = []
