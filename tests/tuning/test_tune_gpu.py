"""GPUs through Spark's resource scheduling for tune trials, without a GPU: `local-cluster` with a
discovery script that announces two GPU addresses. Each trial's task must receive its address;
`device='auto'` then trains on the CPU (no CUDA here) and says so; `device='cuda'` fails the trial with
an error naming the address and why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_selection import _layout

from _cluster import gpu_cluster_conf


@pytest.mark.slow
@pytest.mark.cluster
def test_each_trial_gets_the_gpu_spark_assigned_it(tmp_path: Path) -> None:
    data = _layout(tmp_path / "data")
    conf = gpu_cluster_conf(tmp_path)
    out = tmp_path / "out.json"
    script = tmp_path / "driver.py"
    script.write_text(
        textwrap.dedent(f"""
        import json
        from deepspark.spark import session
        from deepspark.tuning import tune
        spark = session("local-cluster[1,2,1024]", conf={conf!r})
        space = {{"hidden": {{"type": "choice", "values": [8, 16]}}, "epochs": 1, "batch_size": 16}}
        common = dict(data_dir={str(data)!r}, model="mlp", space=space, trials=4, sampler="random",
                      pruner="none", parallelism=2, default_config=False)
        try:
            auto = tune(**common, run_dir={str(tmp_path / "auto")!r})
            cuda = tune(**common, device="cuda", max_failures=2, run_dir={str(tmp_path / "cuda")!r})
        finally:
            spark.stop()
        json.dump({{
            "devices": [r.metrics["device"] for r in auto.records],
            "counts": auto.counts(),
            "cuda_counts": cuda.counts(),
            "cuda_errors": sorted({{r.error for r in cuda.records}}),
        }}, open({str(out)!r}, "w"))
        """)
    )
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1"}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stdout.decode(errors="replace")[-3000:] + proc.stderr.decode()[-3000:]
    result = json.loads(out.read_text())
    assert result["counts"] == {"complete": 4, "pruned": 0, "fail": 0}
    # Each trial's task got a GPU address from Spark (two tasks at once: both addresses are used), and
    # (no CUDA here) trained on the CPU, saying which GPU it was given.
    assert set(result["devices"]) == {"cpu (Spark assigned GPU 0)", "cpu (Spark assigned GPU 1)"}
    # --device cuda: never a silent fall back; every trial fails naming the address and the reason.
    assert result["cuda_counts"]["complete"] == 0 and result["cuda_counts"]["fail"] >= 2
    assert all(
        e.startswith("ConfigError: device 'cuda': cannot use GPU ") and "CUDA is not available" in e
        for e in result["cuda_errors"]
    ), result["cuda_errors"]
