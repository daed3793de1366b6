"""GPUs through Spark's resource scheduling, without a GPU: `local-cluster` with a discovery script that
announces two GPU addresses. Each training task must receive its own address; `device='auto'` then trains
on the CPU (no CUDA here) and says so; `device='cuda'` is an error naming the address and why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_fit import _layout_dir


@pytest.mark.slow
@pytest.mark.cluster
def test_each_task_gets_the_gpu_spark_assigned_it(tmp_path: Path) -> None:
    data = _layout_dir(tmp_path / "data", train=40, test=20)
    discovery = tmp_path / "gpus.sh"
    discovery.write_text('#!/bin/sh\necho \'{"name": "gpu", "addresses": ["0", "1"]}\'\n')
    discovery.chmod(0o755)
    out = tmp_path / "out.json"
    script = tmp_path / "driver.py"
    script.write_text(
        textwrap.dedent(f"""
        import json
        from deepspark.errors import DeepsparkError
        from deepspark.spark import session
        from deepspark.training import fit
        spark = session("local-cluster[1,2,1024]", conf={{
            "spark.driver.host": "127.0.0.1", "spark.driver.bindAddress": "127.0.0.1",
            "spark.worker.resource.gpu.amount": "2",
            "spark.worker.resource.gpu.discoveryScript": {str(discovery)!r},
            "spark.executor.resource.gpu.amount": "2",
            "spark.task.resource.gpu.amount": "1"}})
        try:
            auto = fit({str(data)!r}, "mlp", workers=2, config={{"epochs": 1, "batch_size": 8}},
                       average={{"tau": 2}}, run_dir={str(tmp_path / "auto")!r})
            try:
                fit({str(data)!r}, "mlp", workers=2, device="cuda", config={{"epochs": 1}},
                    run_dir={str(tmp_path / "cuda")!r})
                error = None
            except DeepsparkError as exc:
                error = str(exc)
        finally:
            spark.stop()
        json.dump({{"devices": auto.devices, "accuracy": auto.test_accuracy, "error": error}},
                  open({str(out)!r}, "w"))
        """)
    )
    proc = subprocess.run(
        [sys.executable, str(script)],
        env={**os.environ, "SPARK_LOCAL_IP": "127.0.0.1"},
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == 0, (
        proc.stdout.decode(errors="replace")[-3000:] + proc.stderr.decode(errors="replace")[-3000:]
    )
    result = json.loads(out.read_text())
    devices = result["devices"]
    assert sorted(devices) == ["0", "1"]
    # Each task got its own GPU address from Spark, and (no CUDA here) trained on the CPU, saying so.
    assert sorted(devices.values()) == ["cpu (Spark assigned GPU 0)", "cpu (Spark assigned GPU 1)"]
    assert result["accuracy"] is not None
    assert "device 'cuda': cannot use GPU" in result["error"]
    assert "CUDA is not available" in result["error"]
    assert not (tmp_path / "cuda" / "model").exists()
