"""The multilayer perceptron: one flat parameter vector, views per layer, forward and backprop.

Layout of ``params`` (and of every gradient buffer): for each layer l in order,
``W(l)`` row-major with shape ``(sizes[l+1], sizes[l])``, then ``b(l)`` with shape
``(sizes[l+1],)``. ``weights[l]`` and ``biases[l]`` are views into ``params``, so an
optimizer that updates ``params`` in place updates every layer, and one
``Allreduce`` of the gradient buffer combines every layer at once.

Batch form of the math (rows are samples): ``Z = A_prev @ W.T + b``, ``A = g(Z)``;
``delta_L = dL/dA * g'(Z)``; ``delta_l = (delta_{l+1} @ W_{l+1}) * g'(Z_l)``;
``dW = delta.T @ A_prev``; ``db = sum_rows(delta)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from dpbp import ops
from dpbp.products import make_products

INITS = ("auto", "he", "xavier", "normal")
NORMAL_INIT_STD = 0.1
DTYPES = ("float32", "float64")
# Rows per forward chunk in predict/evaluate: bounds memory on large inputs.
EVAL_CHUNK = 4096


@dataclass
class BatchStats:
    """What one forward(+backward) pass over some rows produced, as sums (see loss_and_grad_sum)."""

    loss_sum: float
    n_correct: int
    n: int


class _Workspace:
    """Preallocated buffers for one batch size, so repeated steps allocate nothing large.

    z[l]: (n, sizes[l+1]) pre-activations of layer l; hidden ones are overwritten
    in place by their activations. out: (n, n_out) output activations.
    delta_a/delta_b: two flat ping-pong buffers for hidden deltas; scratch: one flat
    buffer for activation derivatives; out_* buffers serve the loss.
    """

    def __init__(self, sizes: Sequence[int], n: int, dtype: np.dtype):
        widths = sizes[1:]
        self.n = n
        self.z = [np.empty((n, w), dtype) for w in widths]
        n_out = sizes[-1]
        self.out = np.empty((n, n_out), dtype)
        self.out_delta = np.empty((n, n_out), dtype)
        self.out_scratch = np.empty((n, n_out), dtype)
        self.target = np.empty((n, n_out), dtype)
        self.row_max = np.empty(n, dtype)
        self.row_sum = np.empty(n, dtype)
        wide = n * max(widths)
        self.delta_a = np.empty(wide, dtype)
        self.delta_b = np.empty(wide, dtype)
        self.scratch = np.empty(wide, dtype)
        # relu's derivative as a bool mask (float32 only: measured 0.30 vs 0.46 ms per 512x1024
        # layer; for float64 NumPy's bool->float64 cast buffer would outweigh the saving)
        self.mask = np.empty(wide, bool) if dtype == np.float32 else None
        self.ones = np.ones(n, dtype)  # bias gradients as ones @ delta: a BLAS call, 2x faster than sum

    @staticmethod
    def view(flat: np.ndarray, n: int, width: int) -> np.ndarray:
        """A (n, width) view onto the start of a flat buffer."""
        return flat[: n * width].reshape(n, width)


class MLP:
    """A fully connected network trained by backpropagation.

    Args:
        sizes: ``[n_in, hidden..., n_out]``, at least two entries, all >= 1.
        activation: hidden activation (``ops.HIDDEN_ACTIVATIONS``).
        output: output activation (``ops.OUTPUT_ACTIVATIONS``).
        loss: ``mse``, ``cross_entropy`` (softmax output) or ``binary_cross_entropy``
            (sigmoid output). Losses are per sample, averaged over the batch; ``mse`` is
            ``1/2 sum_j (a_j - y_j)^2`` per sample (the classic backprop convention).
            The pair sets ``task`` (``ops.task_of``): classification, regression or binary.
        init: ``auto`` (He for relu/leaky_relu layers, Xavier/Glorot uniform otherwise),
            ``he``, ``xavier`` or ``normal`` (N(0, 0.1^2)). Biases start at zero.
        dtype: ``float32`` (default) or ``float64``; every buffer has this dtype.
        precision: ``full`` (default: the matrix products in ``dtype``) or ``bf16-mixed`` (float32
            only: the products' inputs in bfloat16, float32 accumulation; see ``dpbp.products``).
        products: which library computes the matrix products: ``auto`` (torch for bf16-mixed,
            else numpy), ``numpy`` or ``torch`` (the optional PyTorch extra). Raises ValueError for
            an impossible pair, ``MissingExtraError`` without PyTorch, ``UnsupportedCPUError`` for
            bf16-mixed on a CPU without AVX-512 BF16 or AMX.
        seed: weights come from ``np.random.default_rng(seed)`` in float64, then cast,
            so the same seed gives the same weights on every machine and rank.

    Targets ``y`` are int class ids ``(batch,)`` or float rows ``(batch, n_out)``
    (one-hot rows for cross-entropy). With ``n_out == 1``, ``(batch,)`` floats or
    0/1 ints are read as a single target column.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        activation: str = "relu",
        output: str = "softmax",
        loss: str = "cross_entropy",
        init: str = "auto",
        dtype: str = "float32",
        seed: int = 0,
        precision: str = "full",
        products: str = "auto",
    ):
        self.sizes = _check_sizes(sizes)
        if activation not in ops.HIDDEN_ACTIVATIONS:
            raise ValueError(
                f"unknown activation {activation!r}; expected one of {', '.join(ops.HIDDEN_ACTIVATIONS)}"
            )
        self.task = ops.task_of(output=output, loss=loss)  # also checks the pairing
        ops.check_output_width(output, self.sizes[-1])
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; expected one of {', '.join(INITS)}")
        if np.dtype(dtype).name not in DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}; expected float32 or float64")
        self.activation, self.output, self.loss, self.init = activation, output, loss, init
        self.dtype = np.dtype(dtype)
        self.seed = int(seed)
        self.products = make_products(products, precision, self.dtype)  # the library for the matrix products
        self.precision = precision
        self.n_layers = len(self.sizes) - 1
        self.n_params = sum((i + 1) * o for i, o in zip(self.sizes[:-1], self.sizes[1:]))
        self._params = np.zeros(self.n_params, self.dtype)
        self.weights, self.biases = self.layer_views(self._params)
        self._init_weights(seed)
        self._workspaces: dict[int, _Workspace] = {}

    # -------------------------------------------------------------- layout

    @property
    def params(self) -> np.ndarray:
        """The flat parameter vector (write into it in place; it cannot be rebound)."""
        return self._params

    def move_params(self, buf: np.ndarray, *, copy: bool = True) -> None:
        """Keep the parameters in ``buf`` (``(n_params,)``, model dtype) from now on; layer views follow.

        For node-shared memory: ranks that map the same ``buf`` then hold one copy.
        ``copy`` writes the current values into ``buf`` first (let one of the sharing
        processes do it).
        """
        if buf.shape != (self.n_params,) or buf.dtype != self.dtype:
            raise ValueError(f"buf must be a ({self.n_params},) {self.dtype} array")
        if copy:
            buf[...] = self._params
        self._params = buf
        self.weights, self.biases = self.layer_views(buf)

    def layer_slices(self) -> list[tuple[slice, slice]]:
        """(weight slice, bias slice) of each layer inside a flat buffer."""
        out, start = [], 0
        for n_in, n_out in zip(self.sizes[:-1], self.sizes[1:]):
            w_stop = start + n_in * n_out
            out.append((slice(start, w_stop), slice(w_stop, w_stop + n_out)))
            start = w_stop + n_out
        return out

    def layer_views(self, flat: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per-layer (W, b) views into any flat buffer with the ``params`` layout."""
        if flat.shape != (self.n_params,):
            raise ValueError(f"flat buffer must have shape ({self.n_params},), got {flat.shape}")
        ws, bs = [], []
        for (w, b), n_in, n_out in zip(self.layer_slices(), self.sizes[:-1], self.sizes[1:]):
            ws.append(flat[w].reshape(n_out, n_in))
            bs.append(flat[b])
        return ws, bs

    def _init_weights(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        for l, W in enumerate(self.weights):
            fan_out, fan_in = W.shape
            act = self.activation if l < self.n_layers - 1 else self.output
            kind = self.init if self.init != "auto" else ("he" if act in ops.RELU_FAMILY else "xavier")
            if kind == "he":
                w = rng.standard_normal(W.shape) * np.sqrt(2.0 / fan_in)
            elif kind == "xavier":
                limit = np.sqrt(6.0 / (fan_in + fan_out))
                w = rng.uniform(-limit, limit, W.shape)
            else:
                w = rng.standard_normal(W.shape) * NORMAL_INIT_STD
            W[...] = w  # float64 draw, cast once: same weights for float32 and float64 models
            self.biases[l][...] = 0.0

    # -------------------------------------------------------------- checks

    def check_inputs(self, X: np.ndarray) -> None:
        """Raise ValueError unless X is a finite (batch, n_in) array."""
        if not isinstance(X, np.ndarray) or X.ndim != 2:
            raise ValueError(f"X must be a 2-D array (batch, {self.sizes[0]}), got {_describe(X)}")
        if X.shape[1] != self.sizes[0]:
            raise ValueError(f"X has {X.shape[1]} features per row; this model expects {self.sizes[0]}")
        if X.size and not (np.isfinite(np.min(X)) and np.isfinite(np.max(X))):
            bad = np.argwhere(~np.isfinite(X))[0]
            raise ValueError(f"X contains NaN or Inf (first at row {bad[0]}, column {bad[1]})")

    def _as_input(self, X) -> np.ndarray:
        """X validated and in the model's dtype (copied only when it is not already)."""
        X = np.asarray(X)
        if X.ndim == 2 and (np.issubdtype(X.dtype, np.number) or X.dtype == bool):
            X = np.ascontiguousarray(X, dtype=self.dtype)
        self.check_inputs(X)
        return X

    def check_targets(self, y: np.ndarray, n: int) -> None:
        """Raise ValueError unless y fits this model's output for n rows."""
        n_out = self.sizes[-1]
        y = np.asarray(y)
        if y.shape[:1] != (n,):
            raise ValueError(f"y has {y.shape[0] if y.ndim else 0} rows but X has {n}")
        if y.ndim == 1 and np.issubdtype(y.dtype, np.integer):
            if n and (y.min() < 0 or y.max() >= max(n_out, 2)):
                raise ValueError(
                    f"labels must be class ids in [0, {max(n_out, 2) - 1}], found range [{y.min()}, {y.max()}]"
                )
        elif y.ndim == 1 and n_out == 1 or y.ndim == 2 and y.shape[1] == n_out:
            if y.size and not np.all(np.isfinite(y)):
                raise ValueError("y contains NaN or Inf")
        else:
            raise ValueError(
                f"y must be int class ids (batch,) or float targets (batch, {n_out}), got {_describe(y)}"
            )

    # -------------------------------------------------------------- passes

    def _workspace(self, n: int) -> _Workspace:
        ws = self._workspaces.get(n)
        if ws is None:
            if len(self._workspaces) >= 8:  # a handful of batch shapes occur in practice
                self._workspaces.clear()
            ws = self._workspaces[n] = _Workspace(self.sizes, n, self.dtype)
        return ws

    def _forward(self, X: np.ndarray, ws: _Workspace) -> np.ndarray:
        """Fill ws.z (hidden ones activated in place) and ws.out; return ws.out."""
        a = X
        last = self.n_layers - 1
        for l, (W, b) in enumerate(zip(self.weights, self.biases)):
            z = ws.z[l]
            self.products.forward(l, a, W, z)
            z += b
            if l < last:
                scratch = ws.view(ws.scratch, ws.n, z.shape[1])
                a = ops.activation_forward(self.activation, z, z, scratch)
        return ops.output_forward(self.output, ws.z[last], ws.out, ws.row_max, ws.row_sum)

    def _targets(self, y: np.ndarray, ws: _Workspace) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(float target rows or None, int labels or None) for the loss functions."""
        n_out = self.sizes[-1]
        if y.ndim == 1 and np.issubdtype(y.dtype, np.integer):
            if n_out == 1:
                np.copyto(ws.target[:, 0], y)
                return ws.target, None
            if self.loss == "cross_entropy":
                return None, y
            ws.target.fill(0.0)
            ws.target[np.arange(ws.n), y] = 1.0
            return ws.target, y
        if y.ndim == 1:
            np.copyto(ws.target[:, 0], y)
            return ws.target, None
        if y.dtype != self.dtype:
            np.copyto(ws.target, y)
            return ws.target, None
        return y, None

    def _loss_and_delta(self, y: np.ndarray, ws: _Workspace) -> tuple[float, int]:
        target, labels = self._targets(y, ws)
        last = self.n_layers - 1
        # Count before the loss: cross-entropy reuses row buffers.
        correct = ops.count_correct(ws.out, target, labels, self.task)
        loss = ops.loss_sum_and_delta(
            self.loss, self.output, ws.z[last], ws.out, target, labels,
            ws.out_delta, ws.out_scratch, ws.row_max, ws.row_sum,
        )
        return loss, correct

    def _backward(
        self, X: np.ndarray, ws: _Workspace, grad_out: np.ndarray,
        on_layer_ready: Callable[[int], None] | None = None,
    ) -> None:
        """Backprop ws.out_delta (dL_sum/dz of the output layer) into grad_out's layer views."""
        gW, gb = self.layer_views(grad_out)
        delta = ws.out_delta
        buffers = (ws.delta_a, ws.delta_b)
        for l in range(self.n_layers - 1, -1, -1):
            a_prev = X if l == 0 else ws.z[l - 1]
            self.products.weight_grad(l, delta, a_prev, gW[l])
            np.matmul(ws.ones, delta, out=gb[l])
            if l > 0:
                d_prev = ws.view(buffers[l % 2], ws.n, self.sizes[l])
                self.products.backprop(l, delta, self.weights[l], d_prev)
                scratch = ws.view(ws.scratch, ws.n, self.sizes[l])
                mask = ws.view(ws.mask, ws.n, self.sizes[l]) if ws.mask is not None else None
                delta = ops.activation_backward(self.activation, a_prev, d_prev, scratch, mask)
            if on_layer_ready is not None:
                on_layer_ready(l)  # DP: lets the trainer start reducing this layer early

    def loss_and_grad_sum(
        self, X: np.ndarray, y: np.ndarray, out: np.ndarray, *,
        check: bool = True, on_layer_ready: Callable[[int], None] | None = None,
        on_forward_done: Callable[[BatchStats], None] | None = None,
    ) -> BatchStats:
        """Forward and backprop over the given rows, as SUMS (the data-parallel form).

        Writes sum_i dL_i/dparams into ``out`` (``(n_params,)``, model dtype: the caller's
        buffer, e.g. the exchange's), in the ``params`` layout, without any intermediate parameter-sized
        copy. Returns the loss sum, the number of correct predictions and the row
        count. Zero rows give a zero gradient and zero sums. ``check=False`` skips
        input validation (for callers that validated the whole data set once).
        ``on_forward_done(stats)`` is called with the loss sum and counts before
        backprop starts, and ``on_layer_ready(l)`` as soon as layer l's gradient is
        final (layers arrive last to first): together they let a caller start
        reducing early parts of the gradient while backprop continues.
        """
        if out.shape != (self.n_params,) or out.dtype != self.dtype:
            raise ValueError(f"out must be a ({self.n_params},) {self.dtype} array")
        y = np.asarray(y)
        if check:
            X = self._as_input(X)
            self.check_targets(y, X.shape[0])
        n = X.shape[0]
        if n == 0:
            out.fill(0.0)
            if on_forward_done is not None:
                on_forward_done(BatchStats(0.0, 0, 0))
            if on_layer_ready is not None:
                for l in range(self.n_layers - 1, -1, -1):
                    on_layer_ready(l)
            return BatchStats(0.0, 0, 0)
        ws = self._workspace(n)
        self._forward(X, ws)
        loss, correct = self._loss_and_delta(y, ws)
        if on_forward_done is not None:
            on_forward_done(BatchStats(loss, correct, n))
        self._backward(X, ws, out, on_layer_ready)
        return BatchStats(loss, correct, n)

    def loss_and_grad(self, X: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        """Batch-mean loss and its gradient (a new 1-D array in the ``params`` layout)."""
        X = self._as_input(X)
        if X.shape[0] == 0:
            raise ValueError("X has no rows: the mean loss of an empty batch is undefined")
        grad = np.empty(self.n_params, self.dtype)
        stats = self.loss_and_grad_sum(X, y, grad)
        grad /= self.dtype.type(stats.n)
        return stats.loss_sum / stats.n, grad

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Output activations a(L), shape (batch, n_out), dtype of the model."""
        X = self._as_input(X)
        result = np.empty((X.shape[0], self.sizes[-1]), self.dtype)
        for start in range(0, X.shape[0], EVAL_CHUNK):
            rows = X[start : start + EVAL_CHUNK]
            result[start : start + rows.shape[0]] = self._forward(rows, self._workspace(rows.shape[0]))
        return result

    def evaluate_sum(self, X: np.ndarray, y: np.ndarray, *, check: bool = True,
                     on_outputs: Callable[[int, np.ndarray], None] | None = None) -> BatchStats:
        """Loss sum, correct count and row count over X (forward only, in chunks of ``EVAL_CHUNK`` rows).

        ``on_outputs(start, a)``, when given, sees each chunk's output activations ``a``
        ``(rows, n_out)`` (a workspace buffer: read it, do not keep it) for rows ``start:start + rows``,
        so a caller can gather more metrics from the same forward pass.
        """
        y = np.asarray(y)
        if check:
            X = self._as_input(X)
            self.check_targets(y, X.shape[0])
        loss, correct = 0.0, 0
        for start in range(0, X.shape[0], EVAL_CHUNK):
            rows = X[start : start + EVAL_CHUNK]
            ws = self._workspace(rows.shape[0])
            self._forward(rows, ws)
            if on_outputs is not None:
                on_outputs(start, ws.out)
            batch_loss, batch_correct = self._loss_and_delta(y[start : start + rows.shape[0]], ws)
            loss += batch_loss
            correct += batch_correct
        return BatchStats(loss, correct, X.shape[0])

    def loss_value(self, X: np.ndarray, y: np.ndarray) -> float:
        """Batch-mean loss (no gradient)."""
        stats = self.evaluate_sum(X, y)
        if stats.n == 0:
            raise ValueError("X has no rows: the mean loss of an empty batch is undefined")
        return stats.loss_sum / stats.n

    def describe(self) -> dict:
        """The constructor arguments, JSON-ready (saved next to the parameters)."""
        return {
            "sizes": list(self.sizes), "activation": self.activation, "output": self.output,
            "loss": self.loss, "init": self.init, "dtype": self.dtype.name, "seed": self.seed,
        }


def _check_sizes(sizes: Sequence[int]) -> tuple[int, ...]:
    try:
        values = [int(s) for s in sizes]
        exact = all(int(s) == s for s in sizes)
    except (TypeError, ValueError):
        raise ValueError(
            f"sizes must be a list of positive integers [n_in, hidden..., n_out], got {sizes!r}"
        ) from None
    if not exact or len(values) < 2 or min(values) < 1:
        raise ValueError(
            f"sizes must be at least two positive integers [n_in, hidden..., n_out], got {list(sizes)!r}"
        )
    return tuple(values)


def _describe(x) -> str:
    if isinstance(x, np.ndarray):
        return f"an array of shape {x.shape} and dtype {x.dtype}"
    return f"a {type(x).__name__}"
