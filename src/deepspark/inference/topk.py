"""Logits → probabilities → the ``k`` most likely classes, vectorised over a batch."""

from __future__ import annotations

import numpy as np

__all__ = ["softmax", "top_k"]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (then float32), stable for large logits."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z.astype(np.float32)


def top_k(probabilities: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest entries of each row, largest first; ties go to the lower class index.

    Returns ``(indices, values)``, both ``[N, min(k, classes)]``.
    """
    p = np.asarray(probabilities)
    k = min(k, p.shape[1])
    # A stable sort of -p keeps equal probabilities in class order, so ties are deterministic.
    order = np.argsort(-p, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(p, order, axis=1)
