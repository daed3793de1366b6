"""Channels-last weights against the default layout: one training step and one forward pass, side by side.

deepspark's spec models with convolutions hold their weights channels-last (``torch.channels_last``), so
PyTorch runs the convolutions and max-pools with its NHWC kernels. This script times, in one process and
one run, the same model (same seed, same batches) in both layouts, for the zoo's ``lenet`` and ``cnn``:

* a training step (forward, cross-entropy, backward, momentum SGD) at 1 thread x 32 images (one
  ``average`` worker of the training benchmark), 1 x 64 and 2 x 64 (one process with 1 and 2 threads);
* a forward pass of 500 images (``evaluate``'s batch) at 1 and 2 threads, in inference mode.

For each it prints milliseconds in both layouts (best of ``--repeats`` timings of ``--steps`` steps, after
a warm-up) and the ratio default / channels-last; the target is a ratio >= 1 everywhere (the layout must
never be a slowdown), and the outputs of the two layouts must agree to float tolerance. Run:

    .venv/bin/python benchmarks/memory_format.py [--steps 50] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch

CASES = [  # (what, threads, batch)
    ("train", 1, 32),
    ("train", 1, 64),
    ("train", 2, 64),
    ("forward", 1, 500),
    ("forward", 2, 500),
]


def _best(fn: Callable[[], object], steps: int, repeats: int) -> float:
    for _ in range(max(3, steps // 10)):
        fn()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(steps):
            fn()
        best = min(best, (time.perf_counter() - started) / steps)
    return best * 1000


def _models(name: str) -> dict[str, torch.nn.Module]:
    from deepspark.models import build_model, model_spec

    built = {layout: build_model(model_spec(name), seed=0) for layout in ("default", "channels-last")}
    built["default"].to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    return built


def _time(name: str, what: str, threads: int, batch: int, steps: int, repeats: int) -> tuple[float, float]:
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    times = []
    outputs = []
    for model in _models(name).values():
        if what == "train":
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

            def step(model: torch.nn.Module = model, optimizer: torch.optim.Optimizer = optimizer) -> None:
                loss = torch.nn.functional.cross_entropy(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

            times.append(_best(step, steps, repeats))
        else:
            model.eval()
            with torch.inference_mode():
                times.append(_best(lambda model=model: model(x), steps, repeats))
                outputs.append(model(x))
    if outputs:
        torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-4)
    return times[0], times[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(
        f"{os.cpu_count()} cores, torch {torch.__version__}; load average at start {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    print(
        f"{'model':<7}{'what':<9}{'threads':>8}{'batch':>7}{'default ms':>12}{'channels-last ms':>18}{'ratio':>8}"
    )
    worst = float("inf")
    for name in ("lenet", "cnn"):
        for what, threads, batch in CASES:
            steps = args.steps if name == "lenet" else max(5, args.steps // 5)
            default, last = _time(name, what, threads, batch, steps, args.repeats)
            worst = min(worst, default / last)
            print(
                f"{name:<7}{what:<9}{threads:>8}{batch:>7}{default:>12.2f}{last:>18.2f}{default / last:>7.2f}x",
                flush=True,
            )
    print(f"smallest ratio {worst:.2f}x (target >= 1: {'pass' if worst >= 1 else 'FAIL'})")


if __name__ == "__main__":
    main()
