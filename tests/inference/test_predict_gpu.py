"""predict's device choice on a task context that carries a GPU assignment (tests/test_gpu_plumbing.py
runs the whole path on `local-cluster` with a discovery script)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

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
