"""predict under a real fault: an executor SIGKILLed mid-job on a standalone cluster on 127.0.0.1.

The driver runs in a subprocess (a process holds one SparkContext), bounded in time; everything started
is torn down in ``finally`` (``deepspark.standalone``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from deepspark.standalone import executor_pids, standalone_cluster, start_driver


@pytest.mark.slow
@pytest.mark.cluster
def test_an_executor_killed_mid_job_loses_and_repeats_no_row(small_model, tmp_path: Path) -> None:
    """16 partitions of 50 rows, each slowed to about a second, over two one-core workers; once tasks
    run, the second worker's executor is SIGKILLed. Its tasks run again elsewhere, and the output holds
    every input row exactly once."""
    marks, out, preds = tmp_path / "marks", tmp_path / "result.json", tmp_path / "preds"
    marks.mkdir()
    rows = 800
    with standalone_cluster(tmp_path, workers=2, cores=1, memory="1g") as (url, procs):
        script = tmp_path / "driver.py"
        script.write_text(
            textwrap.dedent(f"""
            import json, os, time
            import numpy as np
            from deepspark.inference import predict
            from deepspark.spark import session

            def pixels(batches):
                from pyspark import TaskContext
                ctx = TaskContext.get()
                open(os.path.join({str(marks)!r}, f"{{ctx.partitionId()}}-{{ctx.attemptNumber()}}"), "w").close()
                time.sleep(1.0)  # slow partitions: the kill lands while tasks run
                for batch in batches:
                    rng = np.random.default_rng(0)
                    batch["pixels"] = [rng.integers(0, 255, 784).astype(float) for _ in batch["id"]]
                    yield batch

            spark = session({url!r}, conf={{"spark.driver.host": "127.0.0.1",
                            "spark.driver.bindAddress": "127.0.0.1", "spark.executor.memory": "512m",
                            "spark.cores.max": "2"}})
            data = spark.range(0, {rows}, numPartitions=16).mapInPandas(pixels, "id long, pixels array<double>")
            result = predict(data, {str(small_model.path)!r}, output={str(preds)!r}, batch_size=25)
            json.dump({{"rows": result.summary.rows, "errors": result.summary.errors}}, open({str(out)!r}, "w"))
            """)
        )
        driver = start_driver(script, tmp_path, procs)
        deadline = time.monotonic() + 180
        while not (any(marks.iterdir()) and executor_pids(procs[2])):
            assert time.monotonic() < deadline, "the job never started on the cluster"
            assert driver.poll() is None, driver.communicate()[0].decode(errors="replace")[-3000:]
            time.sleep(0.2)
        os.kill(executor_pids(procs[2])[0], signal.SIGKILL)  # the second worker's executor JVM
        try:
            output, _ = driver.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            pytest.fail("predict did not finish within 240 s of the executor loss")
        assert driver.returncode == 0 and out.exists(), output.decode(errors="replace")[-3000:]
    import pyarrow.parquet as pq

    ids = sorted(pq.read_table(preds, columns=["id", "error"]).column("id").to_pylist())
    assert ids == list(range(rows))  # every input row exactly once
    assert pq.read_table(preds).column("error").null_count == rows
    attempts = [tuple(int(v) for v in mark.name.split("-")) for mark in marks.iterdir()]
    assert any(attempt > 0 for _, attempt in attempts), attempts  # the kill did cost a running task
