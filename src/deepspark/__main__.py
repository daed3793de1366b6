"""``python -m deepspark``: the same as the ``deepspark`` command."""

import sys

from deepspark.cli import main

if __name__ == "__main__":
    sys.exit(main())
