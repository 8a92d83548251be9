"""Fencing a coordinator's producer: what makes "no decision" final.

The coordinator's producers fence their previous incarnation at start-up;
the recovery worker fences a producer before it concludes that a transaction
has no decision. Both use this one function.
"""

from __future__ import annotations

from ._producers import ProducerFactory, fence

__all__ = ["ProducerFactory", "fence"]
