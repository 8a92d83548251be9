"""Recovery worker: resolves in-doubt prepared transactions from the decision log.

Run it as a scheduled job (``python -m recovery`` / ``pgkafka-recovery``), or
in-process with :func:`recover` (any time) and :func:`recover_own` (right
after a coordinator opened, for that instance's own earlier transactions).
"""

from ._model import InDoubt, RecoveryReport, Remaining
from ._worker import RecoveryConfig, RecoveryError, arecover_own, recover, recover_own

__all__ = [
    "InDoubt",
    "RecoveryConfig",
    "RecoveryError",
    "RecoveryReport",
    "Remaining",
    "arecover_own",
    "recover",
    "recover_own",
]
