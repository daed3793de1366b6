"""Reports: a read-only, self-contained HTML view of tuning studies and training runs.

This layer sits above both ``tuning/`` and ``training/`` (it reads what either leaves in a run
directory) and is imported by neither, except through the command-line entry points.
"""

from deepspark.reporting._report import Report, report

__all__ = ["Report", "report"]
