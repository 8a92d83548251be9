"""``python -m tests.faults``: the crash-and-fault campaign (see :mod:`tests.faults.campaign`)."""

import sys

from tests.faults.campaign import main

if __name__ == "__main__":
    sys.exit(main())
