"""GPUs through Spark's resource scheduling for predict, without a GPU: `local-cluster` with a discovery
script that announces two GPU addresses. Each task must see the address Spark assigned it; `device='auto'`
then runs the model on the CPU (no CUDA here) and says so; `device='cuda'` fails naming the address and why.
Also the device choice itself, on a task context that carries a GPU assignment."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from _inference_support import Model, png_bytes

from _cluster import gpu_cluster_conf, run_driver_script
from deepspark.errors import ConfigError
from deepspark.inference.runners import runner_device


@dataclass(frozen=True)
class _Gpus:
    addresses: list[str]


class _Context:
    """What ``TaskContext.resources()`` gives a task that Spark assigned ``addresses``."""

    def __init__(self, *addresses: str) -> None:
        self._gpus = {"gpu": _Gpus(list(addresses))} if addresses else {}

    def resources(self) -> dict[str, _Gpus]:
        return self._gpus


@pytest.mark.skipif(torch.cuda.is_available(), reason="asserts the errors of a machine without CUDA")
def test_device_choice_follows_the_assignment_and_never_falls_back_silently() -> None:
    for backend in ("torch", "onnx"):
        assert runner_device("auto", backend, _Context("3")) == "cpu"
        assert runner_device("cpu", backend, _Context("3")) == "cpu"
        with pytest.raises(ConfigError, match=r"device 'cuda': cannot use GPU 3: CUDA is not available"):
            runner_device("cuda", backend, _Context("3"))
        with pytest.raises(ConfigError, match=r"cannot use a GPU: Spark assigned this task no GPU"):
            runner_device("cuda", backend, _Context())


@pytest.mark.slow
@pytest.mark.cluster
def test_each_predict_task_gets_the_gpu_spark_assigned_it(small_model: Model, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for i, image in enumerate(small_model.images[:16]):
        (images / f"{i:02d}.png").write_bytes(png_bytes(image))
    conf = gpu_cluster_conf(tmp_path) | {"spark.task.maxFailures": "1"}
    out = tmp_path / "out.json"
    source = f"""
import json
from deepspark.inference import predict
from deepspark.spark import session
spark = session("local-cluster[1,2,1024]", conf={conf!r})
result = {{}}
try:
    for backend in ("torch", "onnx"):
        s = predict({str(images)!r}, {str(small_model.path)!r}, backend=backend, batch_size=4,
                    output={str(tmp_path)!r} + "/auto-" + backend, spark=spark).summary
        result[backend] = {{"devices": list(s.devices), "rows": s.rows, "errors": s.errors}}
    try:
        predict({str(images)!r}, {str(small_model.path)!r}, device="cuda",
                output={str(tmp_path / "cuda")!r}, spark=spark)
        result["error"] = None
    except Exception as exc:
        result["error"] = str(exc)
finally:
    spark.stop()
json.dump(result, open({str(out)!r}, "w"))
"""
    run_driver_script(source, tmp_path)
    result = json.loads(out.read_text())
    for backend in ("torch", "onnx"):
        assert (result[backend]["rows"], result[backend]["errors"]) == (16, 0)
        devices = result[backend]["devices"]
        # Every task saw a GPU address from Spark and (no CUDA here) ran on the CPU, saying which one.
        assert devices and all(re.fullmatch(r"cpu \(Spark assigned GPU [01]\)", d) for d in devices), devices
    # The failed job is one line naming the tasks' cause (a RunError: exit 1 on the command line).
    assert result["error"].startswith("predict: the Spark job failed: ")
    assert "device 'cuda': cannot use GPU " in result["error"] and "\n" not in result["error"]
    assert "CUDA is not available" in result["error"]
    assert not (tmp_path / "cuda" / "_SUCCESS").exists()
