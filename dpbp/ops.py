"""Pure forward/backward pairs: activations and losses.

Every function works in place on caller-owned buffers (``out=``) so a training
step allocates nothing activation-sized. Scalars are Python floats, which NumPy 2
treats as "weak": a float32 array times ``0.5`` stays float32.

Shapes: ``z`` and ``a`` are ``(batch, width)``; the loss functions work on the
output layer ``(batch, n_out)``.
"""

from __future__ import annotations

import numpy as np

# Which output activation each loss may be paired with (the one place that says so).
LOSS_OUTPUTS = {
    "mse": ("softmax", "sigmoid", "identity"),
    "cross_entropy": ("softmax",),
    "binary_cross_entropy": ("sigmoid",),
}
LOSSES = tuple(LOSS_OUTPUTS)
# What a model's outputs mean follows its loss and output layer, never the values of the data:
# classification takes class labels, regression any numeric targets, binary targets in [0, 1].
TASKS = ("classification", "regression", "binary")
LEAKY_SLOPE = 0.01
RELU_FAMILY = ("relu", "leaky_relu")


def check_pairing(output: str, loss: str) -> None:
    """Raise ValueError unless ``output`` and ``loss`` make sense together (config, MLP and files use this)."""
    if output not in OUTPUT_ACTIVATIONS:
        raise ValueError(f"unknown output activation {output!r}; expected one of {', '.join(OUTPUT_ACTIVATIONS)}")
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; expected one of {', '.join(LOSSES)}")
    if output not in LOSS_OUTPUTS[loss]:
        allowed = " or ".join(LOSS_OUTPUTS[loss])
        raise ValueError(f"loss {loss!r} needs a {allowed} output layer, not {output!r}")


def check_output_width(output: str, n_out: int) -> None:
    """Raise ValueError for a softmax over fewer than 2 units (constantly 1: nothing could be learned)."""
    if output == "softmax" and n_out < 2:
        raise ValueError(f"a softmax output needs at least 2 units, got {n_out}; use a sigmoid output for one unit")


def task_of(loss: str, output: str) -> str:
    """The task a (loss, output) pair trains for (one of ``TASKS``).

    ``cross_entropy``, and ``mse`` over a softmax (the textbook MSE classifier): classification;
    ``binary_cross_entropy``: binary (one 0/1 or soft target per output); ``mse`` over an identity
    or sigmoid output: regression. Raises ValueError for an unknown or mismatched pair.
    """
    check_pairing(output, loss)
    if loss == "cross_entropy" or output == "softmax":
        return "classification"
    return "binary" if loss == "binary_cross_entropy" else "regression"


# ----------------------------------------------------------------------------- activations


def sigmoid_forward(z: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out = 1 / (1 + exp(-z)), computed as 0.5 * (1 + tanh(z / 2)): no overflow for any z."""
    np.multiply(z, 0.5, out=out)
    np.tanh(out, out=out)
    out += 1.0
    out *= 0.5
    return out


def times_sigmoid_derivative(a: np.ndarray, delta: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """delta <- delta * a (1 - a): the sigmoid's derivative written through its output a."""
    np.subtract(1.0, a, out=scratch)
    scratch *= a
    delta *= scratch
    return delta


# Each hidden activation: forward(z, out, scratch) writes g(z) into ``out`` (which may be ``z``);
# backward(a, delta, scratch, mask) does delta <- delta * g'(z) in place, with g' written through
# a = g(z) (sigmoid: a(1-a), tanh: 1-a^2, relu: [a>0]), so the forward pass can overwrite z with a.
# ``scratch`` has z's shape; ``mask`` (bool, or None) is optional scratch for relu.


def relu_forward(z, out, scratch):
    return np.maximum(z, 0.0, out=out)


def relu_backward(a, delta, scratch, mask=None):
    if mask is not None:  # a bool mask: a quarter of the memory traffic of a float one
        np.greater(a, 0.0, out=mask)
        return np.multiply(delta, mask, out=delta)
    np.sign(a, out=scratch)  # a >= 0, so sign(a) is exactly [a > 0]
    delta *= scratch
    return delta


def leaky_relu_forward(z, out, scratch):
    np.multiply(z, LEAKY_SLOPE, out=scratch)
    return np.maximum(z, scratch, out=out)


def leaky_relu_backward(a, delta, scratch, mask=None):
    np.greater(a, 0.0, out=scratch)
    scratch *= 1.0 - LEAKY_SLOPE
    scratch += LEAKY_SLOPE
    delta *= scratch
    return delta


def sigmoid_backward(a, delta, scratch, mask=None):
    return times_sigmoid_derivative(a, delta, scratch)


def tanh_forward(z, out, scratch):
    return np.tanh(z, out=out)


def tanh_backward(a, delta, scratch, mask=None):
    np.multiply(a, a, out=scratch)
    np.subtract(1.0, scratch, out=scratch)
    delta *= scratch
    return delta


def identity_forward(z, out, scratch):
    if out is not z:
        np.copyto(out, z)
    return out


def identity_backward(a, delta, scratch, mask=None):
    return delta


ACTIVATIONS = {  # name: (forward, backward); the config's model.activation allows exactly these
    "sigmoid": (lambda z, out, scratch: sigmoid_forward(z, out), sigmoid_backward),
    "tanh": (tanh_forward, tanh_backward),
    "relu": (relu_forward, relu_backward),
    "leaky_relu": (leaky_relu_forward, leaky_relu_backward),
    "identity": (identity_forward, identity_backward),
}
HIDDEN_ACTIVATIONS = tuple(ACTIVATIONS)


def _pair(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; expected one of {', '.join(HIDDEN_ACTIVATIONS)}") from None


def activation_forward(name: str, z: np.ndarray, out: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """Write g(z) into ``out`` (which may be ``z`` itself). ``scratch`` has z's shape."""
    return _pair(name)[0](z, out, scratch)


def activation_backward(name: str, a: np.ndarray, delta: np.ndarray, scratch: np.ndarray,
                        mask: np.ndarray | None = None) -> np.ndarray:
    """delta <- delta * g'(z), in place, with g' written in terms of a = g(z) (see ``ACTIVATIONS``)."""
    return _pair(name)[1](a, delta, scratch, mask)


def softmax_forward(z: np.ndarray, out: np.ndarray, row_max: np.ndarray, row_sum: np.ndarray) -> np.ndarray:
    """Row-wise stable softmax. Leaves max_j z and sum_j exp(z - max) in the (batch,) buffers."""
    np.max(z, axis=1, out=row_max)
    np.subtract(z, row_max[:, None], out=out)
    np.exp(out, out=out)
    np.sum(out, axis=1, out=row_sum)
    out /= row_sum[:, None]
    return out


OUTPUTS = {  # name: forward(z, out, row_max, row_sum); its backward is fused into each loss below
    "softmax": softmax_forward,
    "sigmoid": lambda z, out, row_max, row_sum: sigmoid_forward(z, out),
    "identity": lambda z, out, row_max, row_sum: np.copyto(out, z) or out,
}
OUTPUT_ACTIVATIONS = tuple(OUTPUTS)


def output_forward(name: str, z: np.ndarray, out: np.ndarray, row_max: np.ndarray, row_sum: np.ndarray):
    """Output activation of the last layer; ``out`` must not alias ``z`` (losses need z)."""
    if name not in OUTPUTS:
        raise ValueError(f"unknown output activation {name!r}; expected one of {', '.join(OUTPUT_ACTIVATIONS)}")
    return OUTPUTS[name](z, out, row_max, row_sum)


# ----------------------------------------------------------------------------- losses


def cross_entropy_sum_and_delta(output, z, a, target, labels, delta, scratch, row_max, row_sum) -> float:
    """Softmax cross-entropy: -log softmax(z)_y = log(sum exp(z - m)) + m - z_y; fused gradient a - y."""
    np.copyto(delta, a)
    np.log(row_sum, out=row_sum)
    row_sum += row_max  # now logsumexp(z) per row
    if labels is not None:
        rows = np.arange(z.shape[0])
        delta[rows, labels] -= 1.0
        return float(np.sum(row_sum)) - float(np.sum(z[rows, labels]))
    delta -= target
    # one-hot / soft rows: sum_j y_j (lse - z_j) = lse * sum_j y_j - y.z
    np.multiply(target, z, out=scratch)
    np.sum(target, axis=1, out=row_max)  # row_max is free again: reuse it for sum_j y_j
    return float(np.dot(row_sum, row_max)) - float(np.sum(scratch))


def binary_cross_entropy_sum_and_delta(output, z, a, target, labels, delta, scratch, row_max, row_sum) -> float:
    """Sigmoid cross-entropy, stable from the logits: max(z,0) - z*y + log(1 + exp(-|z|)); gradient a - y."""
    np.subtract(a, target, out=delta)
    np.abs(z, out=scratch)
    np.negative(scratch, out=scratch)
    np.exp(scratch, out=scratch)
    np.log1p(scratch, out=scratch)
    total = float(np.sum(scratch))
    np.maximum(z, 0.0, out=scratch)
    total += float(np.sum(scratch))
    np.multiply(z, target, out=scratch)
    return total - float(np.sum(scratch))


def mse_sum_and_delta(output, z, a, target, labels, delta, scratch, row_max, row_sum) -> float:
    """The classic backprop convention: L = 1/2 sum_j (a_j - y_j)^2 per sample, so dL/da = a - y.

    This is half the usual squared error summed over outputs; the reported metric "mse" is the
    plain mean of (a_j - y_j)^2 over every value (see dpbp.train.evaluate). Then dL/dz through
    the output activation: sigmoid a(1 - a); softmax its Jacobian.
    """
    np.subtract(a, target, out=delta)
    total = 0.5 * float(np.vdot(delta, delta))
    if output == "sigmoid":
        times_sigmoid_derivative(a, delta, scratch)
    elif output == "softmax":
        # dz_i = a_i (g_i - sum_j g_j a_j), the softmax Jacobian applied to g = a - y.
        np.multiply(delta, a, out=scratch)
        np.sum(scratch, axis=1, out=row_sum)
        delta -= row_sum[:, None]
        delta *= a
    return total


LOSS_FUNCTIONS = {  # name: loss sum and dL_sum/dz; the same names as LOSS_OUTPUTS
    "mse": mse_sum_and_delta,
    "cross_entropy": cross_entropy_sum_and_delta,
    "binary_cross_entropy": binary_cross_entropy_sum_and_delta,
}


def loss_sum_and_delta(
    loss: str,
    output: str,
    z: np.ndarray,
    a: np.ndarray,
    target: np.ndarray,
    labels: np.ndarray | None,
    delta: np.ndarray,
    scratch: np.ndarray,
    row_max: np.ndarray,
    row_sum: np.ndarray,
) -> float:
    """Return the SUM over rows of the per-sample loss and write dL_sum/dz into ``delta``.

    z, a, delta, scratch: (batch, n_out). ``target`` is (batch, n_out) float targets
    (one-hot rows for class labels). ``labels`` are the int class ids when the
    targets came from them (lets cross-entropy skip the one-hot work), else None.
    row_max/row_sum hold what ``softmax_forward`` left there. ``scratch`` is
    clobbered. Sums, not means: the data-parallel step adds sums across ranks
    and divides once by the global count.
    """
    if loss not in LOSS_FUNCTIONS:
        raise ValueError(f"unknown loss {loss!r}; expected one of {', '.join(LOSSES)}")
    return LOSS_FUNCTIONS[loss](output, z, a, target, labels, delta, scratch, row_max, row_sum)


def count_correct(a: np.ndarray, target: np.ndarray, labels: np.ndarray | None,
                  task: str = "classification") -> int:
    """Rows predicted correctly: ``a`` and ``target`` (batch, n_out), ``labels`` (batch,) int or None.

    classification: argmax of ``a`` equals the label (or the argmax of the target row; with one
    output, ``a > 0.5`` against ``y > 0.5``); binary: every output thresholded at 0.5 matches its
    target thresholded at 0.5 (for several outputs, scikit-learn's subset accuracy); regression: 0
    (accuracy means nothing there).
    """
    if task == "regression":
        return 0
    if task == "binary" or a.shape[1] == 1:
        hits = (a > 0.5) == (target > 0.5)
        return int(np.count_nonzero(hits.all(axis=1)))
    truth = labels if labels is not None else np.argmax(target, axis=1)
    return int(np.count_nonzero(np.argmax(a, axis=1) == truth))
