"""``python -m faults``: the crash-and-fault campaign (see :mod:`faults.campaign`)."""

import sys

from faults.campaign import main

if __name__ == "__main__":
    sys.exit(main())
