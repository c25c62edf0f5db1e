"""Dev-set metrics for fine-tuned models, in numpy: accuracy, F1, Matthews correlation, Pearson, Spearman.

Classification metrics take predicted and true class indices; regression metrics take float
predictions and targets. Every metric here is "higher is better", and an undefined value (no
positive class anywhere for F1, a constant input for a correlation) is 0.0, never NaN, so that
best-checkpoint selection always has a number to compare.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Callable, Optional, Sequence

import numpy as np

from lmforge.errors import LmforgeError


def _as_classes(preds, labels) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(preds), np.asarray(labels)
    if p.shape != y.shape or p.ndim != 1:
        raise ValueError(f"preds and labels must be 1-d and of equal length, got {p.shape} and {y.shape}")
    return p.astype(np.int64), y.astype(np.int64)


def _confusion(preds, labels) -> np.ndarray:
    """Confusion matrix over the classes seen in either array: rows true class, columns predicted."""
    p, y = _as_classes(preds, labels)
    classes, index = np.unique(np.concatenate([y, p]), return_inverse=True)
    k = len(classes)
    return np.bincount(index[: len(y)] * k + index[len(y):], minlength=k * k).reshape(k, k)


def accuracy(preds, labels) -> float:
    p, y = _as_classes(preds, labels)
    return float(np.mean(p == y)) if len(y) else 0.0


def _f1_from_counts(tp, fp, fn) -> np.ndarray:
    denom = (2 * tp + fp + fn).astype(np.float64)
    return np.divide(2 * tp, denom, out=np.zeros_like(denom), where=denom > 0)


def f1(preds, labels, positive: int = 1) -> float:
    """Binary F1 of class `positive` (0.0 when it is neither predicted nor present)."""
    p, y = _as_classes(preds, labels)
    tp = np.sum((p == positive) & (y == positive))
    fp = np.sum((p == positive) & (y != positive))
    fn = np.sum((p != positive) & (y == positive))
    return float(_f1_from_counts(np.array([tp]), fp, fn)[0])


def f1_macro(preds, labels) -> float:
    """Unweighted mean of per-class F1 over the classes that occur in labels or predictions."""
    cm = _confusion(preds, labels)
    if cm.size == 0:
        return 0.0
    tp = np.diag(cm).astype(np.float64)
    return float(np.mean(_f1_from_counts(tp, cm.sum(axis=0) - tp, cm.sum(axis=1) - tp)))


def matthews_corrcoef(preds, labels) -> float:
    """Matthews correlation (Gorodkin's K-class form; the usual phi coefficient for two classes)."""
    cm = _confusion(preds, labels).astype(np.float64)
    n = cm.sum()
    correct = np.trace(cm)
    pred_totals, true_totals = cm.sum(axis=0), cm.sum(axis=1)
    cov_py = correct * n - pred_totals @ true_totals
    cov_pp = n * n - pred_totals @ pred_totals
    cov_yy = n * n - true_totals @ true_totals
    if cov_pp == 0 or cov_yy == 0:  # one class predicted or present throughout: no correlation
        return 0.0
    return float(cov_py / np.sqrt(cov_pp * cov_yy))


def _as_values(preds, targets) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(preds, dtype=np.float64), np.asarray(targets, dtype=np.float64)
    if p.shape != y.shape or p.ndim != 1:
        raise ValueError(f"preds and targets must be 1-d and of equal length, got {p.shape} and {y.shape}")
    return p, y


def pearson(preds, targets) -> float:
    p, y = _as_values(preds, targets)
    p, y = p - p.mean(), y - y.mean()
    denom = np.sqrt((p @ p) * (y @ y)) if len(p) else 0.0
    return float(p @ y / denom) if denom > 0 else 0.0


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing the mean of the ranks they span (as scipy.stats.rankdata)."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def spearman(preds, targets) -> float:
    p, y = _as_values(preds, targets)
    return pearson(_average_ranks(p), _average_ranks(y))


CLASSIFICATION_METRICS: dict[str, Callable[..., float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "f1_macro": f1_macro,
    "mcc": matthews_corrcoef,
}
REGRESSION_METRICS: dict[str, Callable[..., float]] = {"pearson": pearson, "spearman": spearman}
METRICS = {**CLASSIFICATION_METRICS, **REGRESSION_METRICS}
# The dev metrics of the structured task kinds, computed from decoded outputs by their own modules
# (tagging.tagging_metrics, qa.squad_scores, seq2seq.seq2seq_metrics), all x100; the first is the default selection.
KIND_METRICS: dict[str, tuple[str, ...]] = {
    "tokens": ("entity_f1", "entity_precision", "entity_recall", "token_accuracy"),
    "span": ("span_f1", "exact_match"),
    "seq2seq": ("bleu", "rouge1", "rouge2", "rougeL"),
}


def metric_package(module: str, package: str, kind: str) -> ModuleType:
    """Import a scoring package of the structured kinds (an optional dependency), or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise LmforgeError(f"a {kind} task is scored with the {package} package, which is not installed: "
                           f"pip install 'lmforge[tasks]'") from None


def check_metric_names(names: Sequence[str], kind: str, num_labels: Optional[int] = None) -> None:
    """Refuse unknown metrics, ones that do not fit the task kind, and binary F1 on a multi-class task."""
    allowed = KIND_METRICS.get(kind) or (CLASSIFICATION_METRICS if kind == "classification" else REGRESSION_METRICS)
    if not names:
        raise LmforgeError(f"no metrics given (for {kind}: {', '.join(allowed)})")
    for name in names:
        if name not in allowed:
            raise LmforgeError(f"metric {name!r} does not apply to {kind} (choose from {', '.join(allowed)})")
    if "f1" in names and num_labels is not None and num_labels != 2:
        raise LmforgeError(f"metric 'f1' is binary F1 but the task has {num_labels} labels; use 'f1_macro'")


def compute_metrics(names: Sequence[str], preds, labels, positive: int = 1) -> dict[str, float]:
    """{name: value} for each named metric; `positive` is the class index that binary F1 scores."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise LmforgeError(f"unknown metric {unknown[0]!r} (known: {', '.join(METRICS)})")
    return {n: (f1(preds, labels, positive) if n == "f1" else METRICS[n](preds, labels)) for n in names}


def selection_metric(names: Sequence[str], select: Optional[str] = None) -> str:
    """The dev metric that picks the best checkpoint: `select` if given, else the first listed."""
    if select is None:
        return names[0]
    if select not in names:
        raise LmforgeError(f"selection metric {select!r} is not among the task's metrics ({', '.join(names)})")
    return select


def is_better(value: float, best: Optional[float]) -> bool:
    """Whether a dev score beats the best so far (every metric here is higher-is-better)."""
    return best is None or value > best
