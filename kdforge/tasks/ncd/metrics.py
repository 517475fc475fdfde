"""Clustering accuracy with Hungarian matching (scipy.optimize.linear_sum_assignment).

Cluster ids are arbitrary, so accuracy is measured under the best one-to-one map from
predicted clusters to true classes: build the (pred x true) count matrix and maximise the
matched counts. `split_cluster_accuracy` is the task-agnostic protocol of the NCD code family
("v2"): one matching over all samples, then accuracy on the old (known) and new (novel) subsets.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from kdforge.errors import KdforgeError

__all__ = ["cluster_accuracy", "hungarian_match", "split_cluster_accuracy"]


def _as_int_array(x: Tensor | np.ndarray | list[int], name: str) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    if arr.ndim != 1:
        raise KdforgeError(f"cluster accuracy: {name} must be 1-D, got shape {arr.shape}")
    if arr.size and (arr.min() < 0 or not np.issubdtype(arr.dtype, np.integer)):
        raise KdforgeError(f"cluster accuracy: {name} must be non-negative integers")
    return arr.astype(np.int64)


def hungarian_match(
    y_true: Tensor | np.ndarray | list[int], y_pred: Tensor | np.ndarray | list[int]
) -> tuple[dict[int, int], np.ndarray]:
    """Best pred->true map (dict) and the (pred x true) count matrix it was found on."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:  # pragma: no cover - scipy ships with the dev extra
        raise KdforgeError("clustering accuracy needs scipy (pip install scipy)") from None
    t, p = _as_int_array(y_true, "y_true"), _as_int_array(y_pred, "y_pred")
    if t.shape != p.shape or t.size == 0:
        raise KdforgeError(
            f"cluster accuracy: y_true {t.shape} and y_pred {p.shape} must be non-empty and equal"
        )
    size = int(max(t.max(), p.max())) + 1
    counts = np.zeros((size, size), dtype=np.int64)
    np.add.at(counts, (p, t), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return {int(r): int(c) for r, c in zip(rows, cols)}, counts


def cluster_accuracy(
    y_true: Tensor | np.ndarray | list[int], y_pred: Tensor | np.ndarray | list[int]
) -> float:
    """Fraction of samples whose cluster maps to their class under the best one-to-one map."""
    mapping, counts = hungarian_match(y_true, y_pred)
    return float(sum(counts[r, c] for r, c in mapping.items())) / float(counts.sum())


def split_cluster_accuracy(
    y_true: Tensor | np.ndarray | list[int], y_pred: Tensor | np.ndarray | list[int], num_known: int
) -> dict[str, float]:
    """Task-agnostic accuracy: one matching over all samples; `all`, `old` (class < num_known), `new`."""
    mapping, _ = hungarian_match(y_true, y_pred)
    t, p = _as_int_array(y_true, "y_true"), _as_int_array(y_pred, "y_pred")
    mapped = np.array([mapping.get(int(c), -1) for c in p])
    hit = mapped == t
    old = t < num_known
    out = {"all": float(hit.mean())}
    out["old"] = float(hit[old].mean()) if old.any() else float("nan")
    out["new"] = float(hit[~old].mean()) if (~old).any() else float("nan")
    return out
