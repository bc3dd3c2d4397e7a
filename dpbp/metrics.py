"""Metrics from sums: what ``dpbp.train.evaluate`` reports once the ranks' sums are reduced.

Pure functions of counts and float64 sums, so every rank computes the same numbers from the
same reduced buffer and each sample counts once however the rows fell on ranks.

* classification: accuracy, per-class precision, recall, F1 and support, their macro and
  support-weighted averages, and the confusion matrix (rows: true class, columns: predicted),
  as scikit-learn's ``classification_report`` and ``confusion_matrix`` define them (a precision or
  recall with nothing to divide is 0);
* regression: MSE (the plain mean of squared errors over every value; the training loss ``mse``
  is half of it, see ``dpbp.ops``), RMSE (its square root), MAE and R^2 (1 - SSE / SST per
  target column, averaged over columns as scikit-learn's ``r2_score``; a constant column scores
  1 when predicted exactly, else 0).
"""

from __future__ import annotations

import math

import numpy as np


def confusion_counts(truth: np.ndarray, predicted: np.ndarray, k: int) -> np.ndarray:
    """``(k * k,)`` float64 counts of (true class, predicted class) pairs, row-major; ids in [0, k)."""
    return np.bincount(truth.astype(np.int64) * k + predicted, minlength=k * k).astype(np.float64)


def classification_report(confusion: np.ndarray) -> dict:
    """Accuracy and per-class scores of a ``(k, k)`` confusion matrix (rows true, columns predicted).

    Returns JSON-ready lists and floats: ``precision``, ``recall``, ``f1``, ``support`` (one per
    class), ``macro_*`` (over the classes that occur in the data or the predictions, as
    scikit-learn's ``classification_report``) and ``weighted_*`` averages of the three scores,
    ``accuracy`` and ``confusion_matrix`` (lists of ints).
    """
    c = np.asarray(confusion, dtype=np.float64)
    hits = np.diag(c)
    support, predicted = c.sum(axis=1), c.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, hits / predicted, 0.0)
        recall = np.where(support > 0, hits / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    total = support.sum()
    report = {"accuracy": float(hits.sum() / total) if total else math.nan,
              "precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist(),
              "support": [int(s) for s in support]}
    seen = (support > 0) | (predicted > 0)  # classes in the data or the predictions, as scikit-learn averages
    for name, values in (("precision", precision), ("recall", recall), ("f1", f1)):
        report[f"macro_{name}"] = float(values[seen].mean()) if seen.any() else math.nan
        report[f"weighted_{name}"] = float(values @ support / total) if total else math.nan
    report["confusion_matrix"] = [[int(v) for v in row] for row in c]
    return report


def regression_report(n: float, sse: np.ndarray, sae: np.ndarray, sst: np.ndarray) -> dict:
    """MSE, RMSE, MAE and R^2 from per-column sums over ``n`` rows.

    ``sse``, ``sae``: sums of squared and absolute errors per column; ``sst``: sums of squared
    deviations of the targets from their (global) mean per column; all float64 ``(k,)`` in the
    targets' own units. With several columns, MSE and MAE average every value, RMSE is the
    square root of that MSE and R^2 the mean of the columns' R^2. NaN for ``n`` = 0.
    """
    if n <= 0:
        return {"mse": math.nan, "rmse": math.nan, "mae": math.nan, "r2": math.nan}
    k = len(sse)
    mse = float(np.sum(sse) / (n * k))
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = np.where(sst > 0, 1.0 - sse / sst, np.where(sse == 0, 1.0, 0.0))
    report = {"mse": mse, "rmse": math.sqrt(mse), "mae": float(np.sum(sae) / (n * k)), "r2": float(r2.mean())}
    if k > 1:
        report["r2_columns"] = r2.tolist()
    return report
