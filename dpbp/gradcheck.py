"""Check backprop against central finite differences, layer by layer.

The network is rebuilt in float64 (finite differences in float32 would measure
rounding, not the gradient). For large layers a random sample of entries is
checked; the relative error of entry i is |g_i - fd_i| / max(|g_i|, |fd_i|, floor)
with ``floor`` = 1e-3 of the largest gradient entry in that layer, so entries that
are numerically zero are judged on an absolute scale. A layer's entries are its W, b and,
with batch norm, gamma and beta; the loss differentiated is the training pass's (the batch's
own statistics, one fixed dropout mask).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dpbp.model import MLP, StepContext
from dpbp.ops import RELU_FAMILY


@dataclass
class LayerCheck:
    layer: int  # 1-based
    checked: int  # entries compared
    total: int  # entries in the layer (W and b; with batch norm also gamma and beta)
    max_rel_error: float
    kinks: int = 0  # entries skipped: a relu kink lies inside the stencil, the loss is not smooth there


def as_float64(model: MLP) -> MLP:
    """A float64 copy of ``model`` with the same parameters."""
    return MLP.from_arrays(dict(model.describe(), dtype="float64"), {"params": model.params, **model.running_arrays()})


def central_difference(model: MLP, X: np.ndarray, y: np.ndarray, index: int, h: float,
                       context: StepContext | None = None) -> float:
    """dL/dp_i by the fourth-order central stencil; restores the parameter.

    (-L(p+2h) + 8 L(p+h) - 8 L(p-h) + L(p-2h)) / 12h: truncation error O(h^4), so a
    step of 1e-3 to 1e-4 keeps both truncation and rounding small in float64. ``context``:
    the training pass whose loss is differentiated (see ``MLP.loss_value``); None: evaluation.
    """
    old = model.params[index]

    def loss_at(delta: float) -> float:
        model.params[index] = old + delta
        return model.loss_value(X, y, context)

    try:
        return (-loss_at(2 * h) + 8 * loss_at(h) - 8 * loss_at(-h) + loss_at(-2 * h)) / (12.0 * h)
    finally:
        model.params[index] = old


def check_gradients(model: MLP, X: np.ndarray, y: np.ndarray, *, samples_per_layer: int = 40,
                    h: float | None = None, seed: int = 0) -> list[LayerCheck]:
    """Compare ``loss_and_grad`` with finite differences on up to ``samples_per_layer`` entries per layer.

    ``model`` must be float64 (see ``as_float64``). Returns one LayerCheck per layer. With
    dropout or batch norm both sides are the training pass of epoch 0, step 0 (one fixed
    mask; the statistics of X), and the running statistics are left as they were.
    The default step ``h`` is 1e-3 for smooth activations (rounding limits tiny,
    vanishing gradients) and 1e-4 for the relu family (a wider stencil would
    straddle kinks, where the derivative jumps).
    """
    if h is None:
        h = 1e-4 if model.activation in RELU_FAMILY else 1e-3
    kinked = model.activation in RELU_FAMILY
    X = np.asarray(X, np.float64)
    context = StepContext(update_running=False) if model.batch_norm or any(model.dropout) else None
    _, grad = model.loss_and_grad(X, y, context)  # update_running=False: the running statistics stay
    rng = np.random.default_rng(seed)
    results = []
    for l, (start, stop) in enumerate(model.layer_blocks()):
        indices = np.arange(start, stop)
        if indices.size > samples_per_layer:
            indices = np.sort(rng.choice(indices, samples_per_layer, replace=False))
        layer_grad = grad[start:stop]
        floor = 1e-3 * max(float(np.max(np.abs(layer_grad))), 1e-300)
        numeric = np.array([central_difference(model, X, y, int(i), h, context) for i in indices])
        smooth = np.ones(indices.size, bool)
        if kinked:
            # Two step sizes disagree only where the stencil straddles a kink; this test never
            # looks at the analytic gradient, so it cannot hide a backprop error.
            finer = np.array([central_difference(model, X, y, int(i), h / 10, context) for i in indices])
            scale = np.maximum(np.maximum(np.abs(numeric), np.abs(finer)), floor)
            smooth = np.abs(numeric - finer) <= 1e-4 * scale
        analytic = grad[indices]
        denom = np.maximum(np.maximum(np.abs(analytic), np.abs(numeric)), floor)
        rel = np.abs(analytic - numeric) / denom
        err = float(np.max(rel[smooth])) if smooth.any() else 0.0
        results.append(LayerCheck(l + 1, int(smooth.sum()), int(stop - start), err, int((~smooth).sum())))
    return results
