"""What :func:`deepspark.fit` trains: a zoo model, a declarative spec, or an ``nn.Module`` factory.

A factory is a zero-argument callable that returns a fresh ``torch.nn.Module`` (the class itself, a
``lambda``, a ``functools.partial``): called with no arguments, the way a PyTorch user builds a network for
data they know. It is not told the input shape or the class count; instead the module it returns is
checked against the data on the driver (one forward pass of zeros) before any training job. Spark pickles
the factory into every task with cloudpickle, like any function a user hands to Spark; each task builds
its module from it and loads the driver's weights, so only weights travel (safetensors bytes).

A factory's final model is ONNX (``model.onnx``, what ``deepspark predict`` runs), with the weights as
``weights.safetensors`` and ``metadata.json`` (preprocess, class names) beside it; a spec's is a deepspark
checkpoint. config.json cannot hold a factory: a resumed run must be given it again.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from deepspark.errors import ConfigError
from deepspark.models.export import ONNX_FILE

if TYPE_CHECKING:
    from deepspark.models import ModelSpec, Preprocess

__all__ = ["FACTORY_KEY", "ONNX_FILE", "WEIGHTS_FILE", "TrainModel", "factory_of"]

FACTORY_KEY = "factory"  # config.json's "model" entry for a factory: {"factory": "module.qualname"}
WEIGHTS_FILE, METADATA_FILE = "weights.safetensors", "metadata.json"


def factory_of(model: Any) -> Callable[[], nn.Module] | None:
    """``model`` if it is an ``nn.Module`` factory; None for a zoo name or spec (str, path, dict, ModelSpec)."""
    from deepspark.models import ModelSpec

    if isinstance(model, nn.Module):
        raise ConfigError(
            f"model: expected a zoo name, a spec or a zero-argument factory returning a torch.nn.Module, "
            f"got a {type(model).__name__} instance; pass a factory instead, e.g. model=lambda: "
            f"{type(model).__name__}(...), so that every worker builds its own copy"
        )
    if isinstance(model, str | Path | Mapping | ModelSpec) or not callable(model):
        return None
    return model


def factory_name(factory: Callable[[], Any]) -> str:
    """``module.qualname`` of a factory (of the function a ``functools.partial`` wraps), for messages."""
    target = getattr(factory, "func", factory)
    name = getattr(target, "__qualname__", None) or type(target).__name__
    module = getattr(target, "__module__", None)
    return f"{module}.{name}" if module else str(name)


@dataclass(frozen=True)
class TrainModel:
    """A run's model: exactly one of ``spec`` (a zoo model or declarative spec) and ``factory``."""

    spec: ModelSpec | None = None
    factory: Callable[[], nn.Module] | None = None

    @classmethod
    def from_factory(cls, factory: Callable[[], nn.Module]) -> TrainModel:
        """Call ``factory`` once, on the driver, before any Spark job: it must return an ``nn.Module``."""
        made = cls(factory=factory)
        made.build()
        return made

    def build(self, seed: int | None = None) -> nn.Module:
        """A fresh module; ``seed`` makes its initial weights reproducible."""
        from deepspark.models import build_model

        if self.spec is not None:
            return build_model(self.spec, seed=seed)
        assert self.factory is not None
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            try:
                module = self.factory()
            except Exception as exc:
                raise ConfigError(
                    f"model: the factory {factory_name(self.factory)} raised {type(exc).__name__}: {exc}"
                ) from exc
        if not isinstance(module, nn.Module):
            raise ConfigError(
                f"model: expected the factory {factory_name(self.factory)} to return a torch.nn.Module, "
                f"got {type(module).__name__}"
            )
        return module

    def config_entry(self, model: Any) -> Any:
        """What config.json records: the zoo name, the spec, or the factory's name (not the factory). A spec
        file's spec, not its path: a resume must build the model the checkpoint's weights were trained in,
        whatever that file holds by then or wherever the resume runs."""
        from deepspark.models import ZOO

        if self.factory is not None:
            return {FACTORY_KEY: factory_name(self.factory)}
        assert self.spec is not None
        return model if isinstance(model, str) and model in ZOO else self.spec.to_dict()

    def check_input(self, shape: tuple[int, int, int]) -> None:
        """A factory's module must take a batch of ``shape`` inputs and return one score row per input."""
        if self.factory is not None:
            self._outputs(shape)

    def check_fits(self, shape: tuple[int, int, int], num_classes: int) -> None:
        """The model takes the data's inputs and scores all its classes (more outputs are allowed)."""
        if self.spec is not None:
            self.spec.check_fits(input_shape=shape, num_classes=num_classes)
            return
        outputs = self._outputs(shape)
        if outputs < num_classes:
            raise ConfigError(
                f"model: the factory's module returns {outputs} score(s) per input, which cannot score the "
                f"data's {num_classes} classes; its last layer needs {num_classes} outputs"
            )

    def _outputs(self, shape: tuple[int, int, int]) -> int:
        module = self.build()
        module.eval()
        try:
            with torch.no_grad():
                out = module(torch.zeros((2, *shape)))
        except Exception as exc:
            raise ConfigError(
                f"model: the factory's module cannot take the data's input {list(shape)} (a batch of shape "
                f"{[2, *shape]}): {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
            got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ConfigError(
                f"model: expected the factory's module to return logits of shape [batch, classes] for a "
                f"batch of shape {[2, *shape]}, got {got}"
            )
        return int(out.shape[1])

    def task_fields(self) -> dict[str, Any]:
        """How a task builds the model: the spec as a dict, or the factory itself (pickled by Spark)."""
        if self.factory is not None:
            return {"spec": None, "factory": self.factory}
        assert self.spec is not None
        return {"spec": self.spec.to_dict(), "factory": None}

    def save(
        self,
        path: Path,
        module: nn.Module,
        *,
        preprocess: Preprocess,
        class_names: Sequence[str],
        metrics: Mapping[str, Any],
        config: Mapping[str, Any],
    ) -> Path:
        """Write the final model to ``path`` (replaced atomically): a checkpoint for a spec; ONNX,
        safetensors weights and metadata.json for a factory."""
        from deepspark.models import save_checkpoint

        if self.spec is not None:
            return save_checkpoint(
                path,
                module,
                self.spec,
                preprocess=preprocess,
                class_names=class_names,
                metrics=metrics,
                config=config,
                overwrite=True,
            )
        from deepspark import rundir
        from deepspark.models import state_to_bytes
        from deepspark.models.checkpoint import output_names
        from deepspark.models.export import export_onnx

        module.eval()
        example = torch.zeros((2, *preprocess.input_shape))
        with torch.no_grad():
            outputs = int(module(example).shape[1])
        names = output_names(class_names, outputs)
        metadata = {
            "preprocess": preprocess.to_dict(),
            "class_names": names,
            "metrics": dict(metrics),
            "config": dict(config),
            "factory": factory_name(self.factory) if self.factory is not None else None,
        }
        return rundir.write_dir_atomic(
            path,
            {
                ONNX_FILE: export_onnx(module, example),
                WEIGHTS_FILE: state_to_bytes(module.state_dict()),
                METADATA_FILE: json.dumps(metadata, indent=2, sort_keys=True).encode("utf-8"),
            },
        )

    def predictable(self, path: Path) -> Path:
        """What ``deepspark predict --model`` takes from the saved model folder ``path``."""
        return path if self.spec is not None else path / ONNX_FILE
