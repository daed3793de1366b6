"""``python -m deepspark``: the same as the ``deepspark`` command.

Also run as a file: ``spark-submit .../deepspark/__main__.py ARGS`` (docs/clusters.md). Python then puts
this folder first on ``sys.path``, where deepspark's ``http.py`` hides the standard library's ``http``
(torch imports it: every command failed with "'http' is not a package"), so the folder is taken off first.
"""

import os
import sys

if not __package__:  # run as a file, not with -m
    _here = os.path.dirname(os.path.realpath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _here]

from deepspark.cli import main  # after the sys.path fix above

if __name__ == "__main__":
    sys.exit(main())
