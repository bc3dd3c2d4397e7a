"""The multilayer perceptron: one flat parameter vector, views per layer, forward and backprop.

Layout of ``params`` (and of every gradient buffer): for each layer l in order,
``W(l)`` row-major with shape ``(sizes[l+1], sizes[l])``, then ``b(l)`` with shape
``(sizes[l+1],)``. ``weights[l]`` and ``biases[l]`` are views into ``params``, so an
optimizer that updates ``params`` in place updates every layer, and one
``Allreduce`` of the gradient buffer combines every layer at once.

Batch form of the math (rows are samples): ``Z = A_prev @ W.T + b``, ``A = g(Z)``;
``delta_L = dL/dA * g'(Z)``; ``delta_l = (delta_{l+1} @ W_{l+1}) * g'(Z_l)``;
``dW = delta.T @ A_prev``; ``db = sum_rows(delta)``.

Optional per hidden layer (training passes only; see ``StepContext``): batch normalization of
``Z`` over the GLOBAL batch, ``Y = gamma * (Z - mean) / sqrt(var + eps) + beta`` before ``g``
(then ``gamma(l)``, ``beta(l)`` follow ``b(l)`` in the layout, and ``b`` has gradient 0: the mean
removes it), and inverted dropout of ``A``, whose mask is a pure function of
``(seed, epoch, step, global row, layer, unit)``. Evaluation uses the running mean/variance and
no dropout.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from dpbp import ops
from dpbp.products import NumpyProducts, make_products

INITS = ("auto", "he", "xavier", "normal")
BN_EPS = 1e-5  # batch norm: added to the variance (torch.nn.BatchNorm1d's default)
BN_MOMENTUM = 0.1  # batch norm: running <- (1 - m) running + m batch statistic (torch's default)
RUNNING_ARRAYS = ("bn_mean", "bn_var")  # batch norm's running mean and variance, as files hold them
DROPOUT_KEY = 0x64726F706F7574  # the second word of the Philox key of dropout masks ("dropout")
NORMAL_INIT_STD = 0.1
DTYPES = ("float32", "float64")
# Rows per forward chunk in predict/evaluate: bounds memory on large inputs.
EVAL_CHUNK = 4096


@dataclass(frozen=True)
class StepContext:
    """Where a training pass sits in training: what dropout masks and batch statistics depend on.

    ``epoch``, ``step``: the pass's epoch and step within it (dropout masks are drawn from them).
    ``offset``: the position in the GLOBAL batch of the first row passed (a rank's shard start).
    ``sum_over_ranks(buf)``: sums a float64 ``buf`` in place over every rank holding part of the
    global batch, identically on each (``comm.sum_in_rank_order_``); None: this process holds the
    whole batch. ``update_running``: fold the batch statistics into the running ones at once
    (False: the caller does it with ``MLP.update_running_stats`` once it keeps the step).
    """

    epoch: int = 0
    step: int = 0
    offset: int = 0
    sum_over_ranks: Callable[[np.ndarray], object] | None = None
    update_running: bool = True


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
        self.sizes, self.dtype = tuple(sizes), dtype
        # a bf16-mixed training pass whose hidden layers the backend keeps in bf16 (``MLP.fused``):
        # hidden[h] is hidden layer h's activations as the backend's bf16 tensor
        self.hidden: list = [None] * (len(widths) - 1)
        self.trained = False  # the buffers below exist once a training pass used this workspace

    def for_training(self, dropout: Sequence[float], batch_norm: bool) -> _Workspace:
        """Allocate (once) what a training pass keeps for backprop; returns self.

        keep[h]: (n, width) dropout multipliers (0 or 1/(1-p)) of hidden layer h; drop[h]: its
        activations times them (the next layer's input); xhat[h]: batch-normalised Z;
        inv_std[h], mean[h], var[h]: float64 (width,) batch statistics; centered: float64 scratch.
        """
        if self.trained:
            return self
        n, hidden, dtype = self.n, self.sizes[1:-1], self.dtype
        self.keep = [np.empty((n, w), dtype) if p > 0 else None for w, p in zip(hidden, dropout)]
        self.drop = [np.empty((n, w), dtype) if p > 0 else None for w, p in zip(hidden, dropout)]
        self.hits = np.empty(n * max(hidden, default=0), bool)  # dropout's kept-or-not, before the cast
        self.xhat = [np.empty((n, w), dtype) for w in hidden] if batch_norm else []
        self.centered = np.empty(n * max(hidden, default=0), np.float64) if batch_norm else None
        self.inv_std = [np.empty(w) for w in hidden] if batch_norm else []
        self.mean = [np.empty(w) for w in hidden] if batch_norm else []
        self.var = [np.empty(w) for w in hidden] if batch_norm else []
        self.global_n = 0.0  # rows of the global batch (batch norm)
        self.trained = True
        return self

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
            only: the training passes' products take bfloat16 inputs with float32 accumulation, and
            hidden layers with a piecewise-linear activation and no dropout or batch norm stay in
            bfloat16 between them, as ``fused`` says; see ``dpbp.products``). Evaluation
            (``predict``, ``evaluate_sum``, ``forward`` without a context) always runs in full
            precision with NumPy, as a reloaded model does (also with ``products = torch``).
        products: which library computes the matrix products: ``auto`` (torch for bf16-mixed,
            else numpy), ``numpy`` or ``torch`` (the optional PyTorch extra). Raises ValueError for
            an impossible pair, ``MissingExtraError`` without PyTorch, ``UnsupportedCPUError`` for
            bf16-mixed on a CPU without AVX-512 BF16 or AMX.
        seed: weights come from ``np.random.default_rng(seed)`` in float64, then cast,
            so the same seed gives the same weights on every machine and rank; dropout masks
            are drawn from it too (``dropout_mask``).
        dropout: inverted dropout rate of the hidden layers' activations in training, one
            number for all or one per hidden layer, each in [0, 1) (0: off).
        batch_norm: normalise each hidden layer's pre-activation over the batch before its
            activation (training: the global batch's statistics; evaluation: the running ones,
            ``running_mean``/``running_var``), with a learned scale ``gamma`` and shift ``beta``.

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
        dropout: float | Sequence[float] = 0.0,
        batch_norm: bool = False,
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
        # Evaluation (predict, evaluate, validation) runs in full precision with NumPy, as the saved model
        # does when it is loaded again: model.precision and model.products are how training computes.
        self._eval_products = NumpyProducts()
        self.n_layers = len(self.sizes) - 1
        hidden = self.sizes[1:-1]
        self.dropout = _check_dropout(dropout, len(hidden))
        if not isinstance(batch_norm, (bool, np.bool_)):
            raise ValueError(f"batch_norm must be true or false, got {batch_norm!r}")
        self.batch_norm = bool(batch_norm)
        self.n_params = n_params(self.sizes, self.batch_norm)
        # Training passes leave the hidden layers to the backend (bf16 from product to product) when it can.
        self.fused = self.n_layers > 1 and not self.unfused_reasons()
        self._params = np.zeros(self.n_params, self.dtype)
        self.weights, self.biases = self.layer_views(self._params)
        self.gammas, self.betas = self.norm_views(self._params)
        # Batch norm's running statistics, float64, hidden units in layer order (views per layer below).
        self.running_mean = np.zeros(sum(hidden) if self.batch_norm else 0)
        self.running_var = np.ones(sum(hidden) if self.batch_norm else 0)
        self._init_weights(seed)
        self._workspaces: dict[int, _Workspace] = {}
        self._pending: _Workspace | None = None  # the batch statistics update_running_stats folds in

    @classmethod
    def from_arrays(cls, spec: dict, arrays) -> MLP:
        """A new model from ``describe()``'s dict and ``arrays`` holding ``params`` (``(n_params,)``, cast to
        ``spec``'s dtype) and, with batch norm, ``bn_mean``/``bn_var`` (as ``running_arrays`` gives them).

        The arrays are copied in. Raises ValueError/TypeError for an invalid ``spec``, ValueError when
        ``params`` does not fit it.
        """
        model = cls(**spec)
        model.params[...] = arrays["params"]
        model.load_running(arrays)
        return model

    def unfused_reasons(self) -> list[str]:
        """Why training passes keep the hidden layers in the model dtype instead of the backend's bf16
        (``fused``), in words: ``activation tanh``, ``dropout``, ``batch norm``; [] when nothing stops it
        (with a backend that fuses nothing, e.g. NumPy's, the activation is named)."""
        return [why for why, blocks in ((f"activation {self.activation}", not self.products.fuses(self.activation)),
                                        ("dropout", any(self.dropout)), ("batch norm", self.batch_norm)) if blocks]

    @property
    def precision(self) -> str:
        """``full`` or ``bf16-mixed``: how the training passes' products compute (the backend's own)."""
        return self.products.precision

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
        self.gammas, self.betas = self.norm_views(buf)

    def layer_slices(self) -> list[tuple[slice, slice]]:
        """(weight slice, bias slice) of each layer inside a flat buffer."""
        return [(w, b) for w, b, _, _ in self._layout()]

    def norm_slices(self) -> list[tuple[slice, slice]]:
        """(gamma slice, beta slice) of each hidden layer's batch norm; [] without batch norm."""
        return [(g, bt) for _, _, g, bt in self._layout()[:-1]] if self.batch_norm else []

    def layer_blocks(self) -> list[tuple[int, int]]:
        """[start, stop) of each layer's whole block of a flat buffer: W, b and (batch norm) gamma, beta."""
        return [(w.start, (bt or b).stop) for w, b, _, bt in self._layout()]

    def _layout(self) -> list[tuple[slice, slice, slice | None, slice | None]]:
        out, start = [], 0
        for l, (n_in, n_out) in enumerate(zip(self.sizes[:-1], self.sizes[1:])):
            w, b = slice(start, start + n_in * n_out), slice(start + n_in * n_out, start + (n_in + 1) * n_out)
            start = b.stop
            gamma = beta = None
            if self.batch_norm and l < self.n_layers - 1:
                gamma, beta = slice(start, start + n_out), slice(start + n_out, start + 2 * n_out)
                start = beta.stop
            out.append((w, b, gamma, beta))
        return out

    def norm_views(self, flat: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per-hidden-layer (gamma, beta) views into a flat buffer of the ``params`` layout ([]: no batch norm)."""
        slices = self.norm_slices()
        return [flat[g] for g, _ in slices], [flat[b] for _, b in slices]

    def running_views(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per-hidden-layer views of ``running_mean`` and ``running_var`` ([] without batch norm)."""
        if not self.batch_norm:
            return [], []
        bounds = np.cumsum([0, *self.sizes[1:-1]])
        return ([self.running_mean[a:b] for a, b in zip(bounds[:-1], bounds[1:])],
                [self.running_var[a:b] for a, b in zip(bounds[:-1], bounds[1:])])

    def running_arrays(self) -> dict[str, np.ndarray]:
        """Copies of batch norm's running statistics as files and checkpoints hold them: ``bn_mean``,
        ``bn_var`` (float64, hidden units in layer order); {} without batch norm."""
        if not self.batch_norm:
            return {}
        return dict(zip(RUNNING_ARRAYS, (self.running_mean.copy(), self.running_var.copy())))

    def load_running(self, arrays) -> None:
        """Batch norm's running statistics become ``arrays["bn_mean"]``/``["bn_var"]`` (as ``running_arrays``
        gives them); nothing without batch norm. Mutates ``running_mean``/``running_var`` in place."""
        if self.batch_norm:
            self.running_mean[...], self.running_var[...] = (arrays[name] for name in RUNNING_ARRAYS)

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
        for gamma, beta in zip(self.gammas, self.betas):
            gamma[...] = 1.0
            beta[...] = 0.0

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

    def _forward(self, X: np.ndarray, ws: _Workspace, context: StepContext | None = None) -> np.ndarray:
        """Fill ws.z (hidden ones activated in place) and ws.out; return ws.out.

        ``context`` None: evaluation (running statistics, no dropout); given: a training pass.
        """
        a = X
        last = self.n_layers - 1
        fused = context is not None and self.fused
        for l, (W, b) in enumerate(zip(self.weights, self.biases)):
            if fused and l < last:
                a = ws.hidden[l] = self.products.hidden_forward(l, a, W, b, self.activation)
                continue
            z = ws.z[l]
            (self.products if context is not None else self._eval_products).forward(l, a, W, z)
            z += b
            if l < last:
                scratch = ws.view(ws.scratch, ws.n, z.shape[1])
                if self.batch_norm:
                    if context is None:
                        self._norm_running(l, z)
                    else:
                        self._norm_batch(l, z, ws, context)
                a = ops.activation_forward(self.activation, z, z, scratch)
                if context is not None and self.dropout[l] > 0:
                    self.dropout_mask(l, context, ws.n, out=ws.keep[l], hits=ws.view(ws.hits, ws.n, z.shape[1]))
                    a = np.multiply(a, ws.keep[l], out=ws.drop[l])  # a stays in z for g'(z) in backprop
        if context is not None and self.batch_norm:
            self._pending = ws
            if context.update_running:
                self.update_running_stats()
        return ops.output_forward(self.output, ws.z[last], ws.out, ws.row_max, ws.row_sum)

    def dropout_mask(self, layer: int, context: StepContext, n: int, out: np.ndarray | None = None,
                     hits: np.ndarray | None = None) -> np.ndarray:
        """Dropout multipliers of hidden layer ``layer`` for global rows ``context.offset`` .. ``+ n``.

        Returns ``out`` (``(n, width)``, model dtype; a new array if None): 0 where a unit is
        dropped, ``1 / (1 - p)`` where it is kept (inverted dropout). Entry (i, j) is a pure
        function of (seed, epoch, step, offset + i, layer, j): Philox4x64 keyed by
        ``(seed, DROPOUT_KEY)`` with the counter ``(row block, layer, step, epoch)``, each row
        taking its own whole blocks (32 bits per unit, rounded up to 8 units), so whichever rank
        holds a row draws the same mask for it. A unit is kept when its 32 bits are below
        ``round((1 - p) 2^32)``. ``hits``: optional ``(n, width)`` bool scratch.
        """
        width, p = self.sizes[layer + 1], self.dropout[layer]
        out = np.empty((n, width), self.dtype) if out is None else out
        if p == 0:
            out.fill(1.0)
            return out
        stride = -(-width // 8) * 8  # 32-bit draws per row: whole Philox blocks of 4 x 64 bits
        key = np.array([self.seed % 2**64, DROPOUT_KEY], np.uint64)
        gen = np.random.Philox(counter=np.array([0, layer, context.step, context.epoch], np.uint64), key=key)
        gen.advance(context.offset * stride // 8)  # DP: jump to this shard's first global row
        draws = gen.random_raw(n * stride // 2).view(np.uint32).reshape(n, stride)[:, :width]
        hits = np.empty((n, width), bool) if hits is None else hits
        np.less(draws, np.uint32(min(round((1.0 - p) * 2**32), 2**32 - 1)), out=hits)
        return np.multiply(hits, 1.0 / (1.0 - p), out=out)

    def _norm_batch(self, l: int, z: np.ndarray, ws: _Workspace, context: StepContext) -> None:
        """z <- gamma * (z - mean) / sqrt(var + eps) + beta over the GLOBAL batch (statistics in float64)."""
        n, width = z.shape
        total = context.sum_over_ranks or (lambda buf: buf)
        sums = np.empty(width + 1)
        np.sum(z, axis=0, dtype=np.float64, out=sums[:width])
        sums[width] = n
        total(sums)  # DP: every rank's rows, zero-row ranks included
        count = float(sums[width])
        if count < 2:
            raise ValueError(f"batch normalization needs at least 2 rows in the (global) batch, got {count:g}")
        mean = np.divide(sums[:width], count, out=ws.mean[l])
        centered = ws.view(ws.centered, n, width)
        np.subtract(z, mean, out=centered)  # float64: z is exact in it
        squares = np.einsum("ij,ij->j", centered, centered)
        total(squares)  # DP: the second pass, about the global mean
        np.divide(squares, count, out=ws.var[l])
        inv_std = ws.inv_std[l]
        np.add(ws.var[l], BN_EPS, out=inv_std)
        np.sqrt(inv_std, out=inv_std)
        np.divide(1.0, inv_std, out=inv_std)
        xhat = ws.xhat[l]
        np.multiply(centered, inv_std, out=xhat)
        np.multiply(xhat, self.gammas[l], out=z)
        z += self.betas[l]
        ws.global_n = count

    def _norm_running(self, l: int, z: np.ndarray) -> None:
        """z <- gamma * (z - running mean) / sqrt(running var + eps) + beta (evaluation; coefficients in float64)."""
        means, variances = self.running_views()
        scale = self.gammas[l] / np.sqrt(variances[l] + BN_EPS)
        z *= scale.astype(self.dtype)
        z += (self.betas[l] - means[l] * scale).astype(self.dtype)

    def update_running_stats(self) -> None:
        """Fold the last training pass's batch statistics into ``running_mean``/``running_var``.

        ``running <- (1 - BN_MOMENTUM) running + BN_MOMENTUM batch``, with the batch variance
        unbiased (times N / (N - 1), N the global rows) as torch does. Each pass is folded in
        at most once; without batch norm (or a pending pass) nothing happens.
        """
        ws, self._pending = self._pending, None
        if ws is None or not self.batch_norm:
            return
        correction = ws.global_n / (ws.global_n - 1.0)
        for mean, var, batch_mean, batch_var in zip(*self.running_views(), ws.mean, ws.var):
            mean *= 1.0 - BN_MOMENTUM
            mean += BN_MOMENTUM * batch_mean
            var *= 1.0 - BN_MOMENTUM
            var += (BN_MOMENTUM * correction) * batch_var

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
        on_layer_ready: Callable[[int], None] | None = None, context: StepContext | None = None,
    ) -> None:
        """Backprop ws.out_delta (dL_sum/dz of the output layer) into grad_out's layer views."""
        gW, gb = self.layer_views(grad_out)
        delta = ws.out_delta
        buffers = (ws.delta_a, ws.delta_b)
        last = self.n_layers - 1
        fused = context is not None and self.fused  # hidden activations and deltas: the backend's bf16 tensors
        for l in range(last, -1, -1):
            a_prev = X if l == 0 else self._layer_output(l - 1, ws, context)
            self.products.weight_grad(l, delta, a_prev, gW[l])
            if self.batch_norm and l < last:
                gb[l].fill(0.0)  # the batch mean removes b: its gradient is exactly 0 (sums would give rounding)
            elif fused and l < last:
                self.products.bias_grad(l, delta, gb[l])
            else:
                np.matmul(ws.ones, delta, out=gb[l])
            if l > 0 and fused:
                delta = self.products.hidden_backprop(l, delta, self.weights[l], ws.hidden[l - 1], self.activation)
            elif l > 0:
                h, width = l - 1, self.sizes[l]
                d_prev = ws.view(buffers[l % 2], ws.n, width)
                self.products.backprop(l, delta, self.weights[l], d_prev)
                if context is not None and self.dropout[h] > 0:
                    d_prev *= ws.keep[h]
                scratch = ws.view(ws.scratch, ws.n, width)
                mask = ws.view(ws.mask, ws.n, width) if ws.mask is not None else None
                delta = ops.activation_backward(self.activation, ws.z[h], d_prev, scratch, mask)
                if self.batch_norm:
                    self._norm_backward(h, delta, ws, grad_out, context)
            if on_layer_ready is not None:
                on_layer_ready(l)  # DP: lets the trainer start reducing this layer early

    def _layer_output(self, h: int, ws: _Workspace, context: StepContext | None) -> np.ndarray:
        """What hidden layer h passes on: its activations, times the dropout mask in training (the backend's
        tensor in a fused training pass)."""
        if context is not None and self.fused:
            return ws.hidden[h]
        return ws.drop[h] if context is not None and self.dropout[h] > 0 else ws.z[h]

    def _norm_backward(self, h: int, delta: np.ndarray, ws: _Workspace, grad_out: np.ndarray,
                       context: StepContext) -> None:
        """delta (dL/dy of hidden layer h) <- dL/dz through the batch norm; writes this rank's dgamma, dbeta.

        With S1 = sum_i dy_i and S2 = sum_i dy_i xhat_i over the GLOBAL batch of N rows:
        dz_i = gamma / sigma (dy_i - S1 / N - xhat_i S2 / N); the local parts of S1 and S2 are this
        rank's dbeta and dgamma sums (the exchange adds the ranks' parts).
        """
        n, width = delta.shape
        xhat = ws.xhat[h]
        sums = np.empty(2 * width)
        np.sum(delta, axis=0, dtype=np.float64, out=sums[:width])
        scratch = ws.view(ws.scratch, n, width)
        np.multiply(delta, xhat, out=scratch)
        np.sum(scratch, axis=0, dtype=np.float64, out=sums[width:])
        gammas, betas = self.norm_views(grad_out)
        betas[h][...] = sums[:width]
        gammas[h][...] = sums[width:]
        if context.sum_over_ranks is not None:
            context.sum_over_ranks(sums)  # DP: the global sums, as torch's SyncBatchNorm reduces them
        k = self.gammas[h] * ws.inv_std[h]  # float64
        k1, k2 = k * sums[:width] / ws.global_n, k * sums[width:] / ws.global_n
        delta *= k.astype(self.dtype)
        np.multiply(xhat, k2.astype(self.dtype), out=scratch)
        delta -= scratch
        delta -= k1.astype(self.dtype)

    def loss_and_grad_sum(
        self, X: np.ndarray, y: np.ndarray, out: np.ndarray, *,
        check: bool = True, on_layer_ready: Callable[[int], None] | None = None,
        on_forward_done: Callable[[BatchStats], None] | None = None,
        context: StepContext | None = None,
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

        ``context``: where this pass sits (``StepContext``); required with dropout (the masks
        depend on it), optional otherwise. With batch norm the statistics are the global
        batch's (``context.sum_over_ranks``; every rank must call, zero-row ranks too, as the
        sums are collective) and the running statistics are updated (unless
        ``context.update_running`` is False). Raises ValueError with dropout and no context, or
        with batch norm over fewer than 2 global rows.
        """
        if out.shape != (self.n_params,) or out.dtype != self.dtype:
            raise ValueError(f"out must be a ({self.n_params},) {self.dtype} array")
        if context is None:
            if any(self.dropout):
                raise ValueError("a model with dropout needs a StepContext (epoch, step, row offset) to draw its "
                                 "masks: pass context=StepContext(...)")
            context = StepContext()
        y = np.asarray(y)
        if check:
            X = self._as_input(X)
            self.check_targets(y, X.shape[0])
        n = X.shape[0]
        if n == 0 and not self.batch_norm:  # batch norm: a zero-row rank still joins every reduction
            out.fill(0.0)
            if on_forward_done is not None:
                on_forward_done(BatchStats(0.0, 0, 0))
            if on_layer_ready is not None:
                for l in range(self.n_layers - 1, -1, -1):
                    on_layer_ready(l)
            return BatchStats(0.0, 0, 0)
        ws = self._workspace(n).for_training(self.dropout, self.batch_norm)
        self._forward(X, ws, context)
        loss, correct = self._loss_and_delta(y, ws)
        if on_forward_done is not None:
            on_forward_done(BatchStats(loss, correct, n))
        self._backward(X, ws, out, on_layer_ready, context)
        return BatchStats(loss, correct, n)

    def loss_and_grad(self, X: np.ndarray, y: np.ndarray,
                      context: StepContext | None = None) -> tuple[float, np.ndarray]:
        """Batch-mean loss and its gradient (a new 1-D array in the ``params`` layout); ``context``: see
        ``loss_and_grad_sum`` (required with dropout)."""
        X = self._as_input(X)
        if X.shape[0] == 0:
            raise ValueError("X has no rows: the mean loss of an empty batch is undefined")
        grad = np.empty(self.n_params, self.dtype)
        stats = self.loss_and_grad_sum(X, y, grad, context=context)
        grad /= self.dtype.type(stats.n)
        return stats.loss_sum / stats.n, grad

    def forward(self, X: np.ndarray, context: StepContext | None = None) -> np.ndarray:
        """Output activations a(L) ``(batch, n_out)`` (a new array, model dtype) of one pass over all of X.

        ``context`` None: evaluation (as ``predict``); given: the training pass of that step
        (dropout masks, batch statistics over ``context.sum_over_ranks``, running statistics
        updated if ``context.update_running``).
        """
        X = self._as_input(X)
        ws = self._workspace(X.shape[0])
        if context is not None:
            ws.for_training(self.dropout, self.batch_norm)
        return self._forward(X, ws, context).copy()

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

    def loss_value(self, X: np.ndarray, y: np.ndarray, context: StepContext | None = None) -> float:
        """Batch-mean loss (no gradient). ``context`` given: the training pass's loss (its dropout masks and
        batch statistics, of X alone; running statistics untouched), else the evaluation loss."""
        if context is not None:
            X = self._as_input(X)
            y = np.asarray(y)
            self.check_targets(y, X.shape[0])
            if X.shape[0] == 0:
                raise ValueError("X has no rows: the mean loss of an empty batch is undefined")
            ws = self._workspace(X.shape[0]).for_training(self.dropout, self.batch_norm)
            self._forward(X, ws, StepContext(context.epoch, context.step, context.offset, update_running=False))
            self._pending = None
            return self._loss_and_delta(y, ws)[0] / X.shape[0]
        stats = self.evaluate_sum(X, y)
        if stats.n == 0:
            raise ValueError("X has no rows: the mean loss of an empty batch is undefined")
        return stats.loss_sum / stats.n

    def describe(self) -> dict:
        """The constructor arguments, JSON-ready (saved next to the parameters)."""
        return {
            "sizes": list(self.sizes), "activation": self.activation, "output": self.output,
            "loss": self.loss, "init": self.init, "dtype": self.dtype.name, "seed": self.seed,
            "dropout": list(self.dropout), "batch_norm": self.batch_norm,
        }


def n_params(sizes: Sequence[int], batch_norm: bool = False) -> int:
    """Length of the flat parameter vector of layer sizes ``sizes``: every W and b, and (batch norm)
    a gamma and a beta per hidden unit."""
    return sum((i + 1) * o for i, o in zip(sizes[:-1], sizes[1:])) + (2 * sum(sizes[1:-1]) if batch_norm else 0)


def _check_dropout(dropout, n_hidden: int) -> tuple[float, ...]:
    """One rate per hidden layer from one number or a list of them; ValueError unless each is in [0, 1)."""
    rates = [dropout] * n_hidden if isinstance(dropout, (int, float, np.number)) else list(dropout)
    if len(rates) != n_hidden:
        raise ValueError(f"dropout needs one rate or one per hidden layer ({n_hidden}), got {list(rates)!r}")
    if not all(isinstance(r, (int, float, np.number)) and not isinstance(r, bool) and 0 <= r < 1 for r in rates):
        raise ValueError(f"dropout rates must be numbers in [0, 1), got {list(rates)!r}")
    return tuple(float(r) for r in rates)


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
