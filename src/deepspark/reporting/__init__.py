"""Reports: a read-only, self-contained HTML view of tuning studies and training runs, and the same
run directories logged to MLflow (:func:`log_to_mlflow`, the ``mlflow`` extra).

This layer sits above both ``tuning/`` and ``training/`` (it reads what either leaves in a run
directory) and is imported by neither, except through the command-line entry points.
"""

import logging
import os
from pathlib import Path

from deepspark.reporting._report import Report, report
from deepspark.reporting._tracking import TrackedRun, check_tracking_uri, log_to_mlflow

__all__ = ["Report", "TrackedRun", "check_tracking_uri", "log_to_mlflow", "report", "write_run_report"]


def write_run_report(run_dir: str | os.PathLike[str]) -> Path | None:
    """Write ``RUN_DIR/report.html`` at the end of ``tune`` / ``train`` and return its path; a failure is
    only logged (None): the run itself succeeded, and a figure never turns it into a failure."""
    try:
        written = report(Path(run_dir), output=Path(run_dir) / "report.html")
    except Exception:
        logging.getLogger(__name__).exception("could not write the report of %s", run_dir)
        return None
    return Path(written.html)
