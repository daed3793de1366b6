"""Named study set-ups: ``quick`` (the ``make run`` job) and ``paper`` (the 2016 blog's experiment)."""

from __future__ import annotations

from typing import Any

from deepspark.errors import ConfigError

__all__ = ["PRESETS", "preset"]

PRESETS: dict[str, dict[str, Any]] = {
    # Under 10 minutes on 2 cores: 6 two-epoch trials of a slimmer CNN, two at a time.
    "quick": {
        "dataset": "mnist",
        "model": "cnn",
        "trials": 6,
        "parallelism": 2,
        "threads_per_trial": 1,
        "sampler": "tpe",
        "pruner": "median",
        "space": {
            "learning_rate": {"type": "loguniform", "low": 5.0e-4, "high": 5.0e-3},
            "fc": {"type": "choice", "values": [256, 1024]},
            "conv1": 16,
            "conv2": 32,
            "epochs": 2,
            "batch_size": 128,
            "lr_schedule": "cosine",
        },
    },
    # The blog's experiment: learning rate × fully-connected width on the full CNN.
    "paper": {
        "dataset": "mnist",
        "model": "cnn",
        # The search benchmarks/hpo_paper.py measures (99.56-99.61% in about 30 minutes on 2 cores).
        "trials": 6,
        "parallelism": 2,
        "threads_per_trial": 1,
        "sampler": "tpe",
        "pruner": "median",
        "space": {
            "learning_rate": {"type": "loguniform", "low": 5.0e-4, "high": 2.5e-3},
            "fc": {"type": "choice", "values": [512, 1024, 2048]},
            "epochs": 10,
            "batch_size": 128,
            "lr_schedule": "cosine",
            "augment": True,
        },
    },
}


def preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError(f"preset: expected one of {sorted(PRESETS)}, got {name!r}")
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in PRESETS[name].items()}
