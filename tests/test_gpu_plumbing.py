"""GPUs through Spark's resource scheduling, without a GPU: one `local-cluster` whose worker announces
two GPU addresses (a discovery script), for all three uses in one driver (a cluster start each cost
half a minute of the suite). Each task of `fit`, `predict` and a `tune` trial must receive its own
address; `device='auto'` then runs on the CPU (no CUDA here) and says which GPU it was given;
`device='cuda'` fails naming the address and why, never falling back silently."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _cluster import gpu_cluster_conf, run_driver_script
from _datasets import bar_dataset


@pytest.mark.slow
@pytest.mark.cluster
def test_each_task_of_fit_predict_and_tune_gets_the_gpu_spark_assigned_it(tmp_path: Path) -> None:
    from deepspark.data import read_idx

    data = bar_dataset(tmp_path / "data", train=40, test=20)
    images = tmp_path / "images"
    images.mkdir()
    for i, image in enumerate(np.asarray(read_idx(data / "t10k-images-idx3-ubyte"))[:16]):
        Image.fromarray(image, mode="L").save(images / f"{i:02d}.png")
    conf = gpu_cluster_conf(tmp_path) | {"spark.task.maxFailures": "1"}
    out = tmp_path / "out.json"
    source = f"""
import json
from deepspark.inference import predict
from deepspark.spark import session
from deepspark.training import fit
from deepspark.tuning import tune

def error_of(call):
    try:
        call()
    except Exception as exc:
        return str(exc)
    return None

spark = session("local-cluster[1,2,1024]", conf={conf!r})
data, images, here = {str(data)!r}, {str(images)!r}, {str(tmp_path)!r}
result = {{}}
try:
    auto = fit(data, "mlp", workers=2, config={{"epochs": 1, "batch_size": 8}}, average={{"tau": 2}},
               run_dir=here + "/fit-auto")
    result["fit"] = {{"devices": auto.devices, "accuracy": auto.test_accuracy}}
    result["fit_cuda"] = error_of(lambda: fit(data, "mlp", workers=2, device="cuda", config={{"epochs": 1}},
                                              run_dir=here + "/fit-cuda"))
    for backend in ("torch", "onnx"):
        s = predict(images, here + "/fit-auto/model", backend=backend, batch_size=4,
                    output=here + "/predict-" + backend, spark=spark).summary
        result[backend] = {{"devices": list(s.devices), "rows": s.rows, "errors": s.errors}}
    result["predict_cuda"] = error_of(lambda: predict(images, here + "/fit-auto/model", device="cuda",
                                                      output=here + "/predict-cuda", spark=spark))
    space = {{"hidden": {{"type": "choice", "values": [8, 16]}}, "epochs": 1, "batch_size": 16}}
    common = dict(data_dir=data, model="mlp", space=space, trials=4, sampler="random", pruner="none",
                  parallelism=2, default_config=False)
    trials = tune(**common, run_dir=here + "/tune-auto")
    failed = tune(**common, device="cuda", max_failures=2, run_dir=here + "/tune-cuda")
    result["tune"] = {{
        "devices": [r.metrics["device"] for r in trials.records],
        "counts": trials.counts(),
        "cuda_counts": failed.counts(),
        "cuda_errors": sorted({{r.error for r in failed.records}}),
    }}
finally:
    spark.stop()
json.dump(result, open({str(out)!r}, "w"))
"""
    run_driver_script(source, tmp_path, timeout=400)
    result = json.loads(out.read_text())
    by_gpu = {"cpu (Spark assigned GPU 0)", "cpu (Spark assigned GPU 1)"}

    # fit: each worker's task got its own address and (no CUDA here) trained on the CPU, saying so.
    assert sorted(result["fit"]["devices"]) == ["0", "1"]
    assert set(result["fit"]["devices"].values()) == by_gpu
    assert result["fit"]["accuracy"] is not None
    assert (
        "device 'cuda': cannot use GPU" in result["fit_cuda"]
        and "CUDA is not available" in result["fit_cuda"]
    )
    assert not (tmp_path / "fit-cuda" / "model").exists()

    # predict, with the model fit saved: every row, each task on the address it was given.
    for backend in ("torch", "onnx"):
        assert (result[backend]["rows"], result[backend]["errors"]) == (16, 0)
        devices = result[backend]["devices"]
        assert devices and all(re.fullmatch(r"cpu \(Spark assigned GPU [01]\)", d) for d in devices), devices
    # The failed job is one line naming the tasks' cause (a RunError: exit 1 on the command line).
    error = result["predict_cuda"]
    assert error.startswith("predict: the Spark job failed: ") and "\n" not in error
    assert "device 'cuda': cannot use GPU " in error and "CUDA is not available" in error
    assert not (tmp_path / "predict-cuda" / "_SUCCESS").exists()

    # tune: two trials at once use both addresses; with device='cuda' every trial fails saying why.
    tuned = result["tune"]
    assert tuned["counts"] == {"complete": 4, "pruned": 0, "fail": 0}
    assert set(tuned["devices"]) == by_gpu
    assert tuned["cuda_counts"]["complete"] == 0 and tuned["cuda_counts"]["fail"] >= 2
    assert all(
        e.startswith("ConfigError: device 'cuda': cannot use GPU ") and "CUDA is not available" in e
        for e in tuned["cuda_errors"]
    ), tuned["cuda_errors"]
