"""Who computes a step's matrix products: NumPy's BLAS, or PyTorch's CPU kernels (float32 or bf16-mixed).

The three products of layer l (rows are samples, ``n`` rows):

* forward   ``Z = A_prev W^T``       ``(n, out)``
* weights   ``dW = delta^T A_prev``  ``(out, in)``
* backprop  ``delta_prev = delta W`` ``(n, in)``

Every backend writes its results into the caller's buffers in the model's dtype, so the flat
parameter and gradient vectors, the exchange and the optimizer never see another dtype. Bias sums
stay in the model (NumPy, model dtype), except in a bf16-mixed pass whose hidden layers the backend
keeps (below).

``bf16-mixed`` (PyTorch Lightning's name): the inputs of the three products are rounded to
bfloat16 (8 significant bits), each product accumulates in float32 inside the kernel (oneDNN or
MKL) and its result is rounded to bfloat16 once; the weights, gradients, loss, softmax and update
stay float32. Each layer's weights are cast once per forward pass (one step), its input once in
the forward pass (reused by ``dW``), and ``delta`` once per layer (used by ``dW`` and by
``delta_prev``). Hidden layers come in two kinds (the model chooses, ``MLP.fused``):

* kept in bf16 (activation in ``BF16_ACTIVATIONS``, no dropout, no batch norm), as under
  ``torch.autocast``: ``hidden_forward`` adds the bias inside the product (``addmm``) and applies
  the activation to the bf16 result in place; the next product, ``dW``, the bias sum and
  ``hidden_backprop`` (``bf16(delta W)`` times ``g'``) take those tensors as they are: no float32
  copy, no cast, no NumPy pass. relu and identity give on a bf16 value exactly what the float32
  path gives once rounded for the next product; leaky_relu's negative side is rounded once more.
* float32 element-wise work (tanh, sigmoid, dropout, batch norm): every product's result is
  written into the model's float32 buffer and the model does the rest in NumPy.

PyTorch is an optional extra (``pip install 'dpbp[torch]'``); it is imported only when asked for.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from dpbp.errors import DpbpError, MissingExtraError
from dpbp.ops import LEAKY_SLOPE

PRECISIONS = ("full", "bf16-mixed")
PRODUCTS = ("auto", "numpy", "torch")
CPUINFO = Path("/proc/cpuinfo")
# Either CPU feature gives bf16 products at speed: AVX-512 BF16 (vdpbf16ps) or the AMX tile unit.
BF16_FEATURES = ("avx512_bf16", "amx_bf16")
# PyPI's default torch wheel for Linux x86_64 is a CUDA build of several GB; the CPU build is on PyTorch's index.
TORCH_EXTRA = ("pip install 'dpbp[torch]' (the CPU-only PyTorch, ~200 MB instead of a multi-GB CUDA build: "
               "pip install torch --index-url https://download.pytorch.org/whl/cpu first)")


class UnsupportedCPUError(DpbpError):
    """The CPU lacks an instruction set the configured precision needs (an environment failure)."""

    exit_code = 1


def cpu_flags(path: Path | None = None) -> set[str] | None:
    """The CPU feature flags of /proc/cpuinfo (``path``), or None where they cannot be read."""
    try:
        text = (path or CPUINFO).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def bf16_support(flags: set[str] | None = None) -> dict[str, bool | None]:
    """``{"avx512_bf16": ..., "amx_bf16": ...}``: True/False, None where the flags are unknown."""
    flags = cpu_flags() if flags is None else flags
    return {f: (None if flags is None else f in flags) for f in BF16_FEATURES}


def describe_cpu() -> str:
    """One line for ``dpbp info`` and the start-up header: AMX / AVX-512 BF16 present or not."""
    have = bf16_support()
    if all(v is None for v in have.values()):
        return "AMX / AVX-512 BF16 unknown (no /proc/cpuinfo flags)"
    return f"AMX {'yes' if have['amx_bf16'] else 'no'}, AVX-512 BF16 {'yes' if have['avx512_bf16'] else 'no'}"


def check_bf16_cpu() -> None:
    """Raise UnsupportedCPUError unless this CPU has AVX-512 BF16 or AMX (bf16 products at speed)."""
    have = bf16_support()
    if any(have.values()):
        return
    why = ("its flags could not be read from /proc/cpuinfo" if all(v is None for v in have.values())
           else "neither avx512_bf16 nor amx_bf16 is in /proc/cpuinfo")
    raise UnsupportedCPUError(
        f"model.precision = bf16-mixed needs a CPU with the avx512_bf16 (AVX-512 BF16) or amx_bf16 (AMX) feature; "
        f"{why}: use model.precision = full")


def torch_available() -> bool:
    """Is PyTorch installed (without importing it)?"""
    return importlib.util.find_spec("torch") is not None


def _import_torch(why: str):
    try:
        import torch
    except ImportError:
        raise MissingExtraError(f"{why} needs PyTorch, which is not installed: {TORCH_EXTRA}") from None
    return torch


def resolve(products: str, precision: str, dtype: np.dtype) -> str:
    """The backend ``auto`` means: torch for bf16-mixed, numpy otherwise (bit-exact across rank counts)."""
    if products not in PRODUCTS:
        raise ValueError(f"unknown products {products!r}; expected one of {', '.join(PRODUCTS)}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if precision == "bf16-mixed":
        if np.dtype(dtype) != np.float32:
            raise ValueError("precision bf16-mixed keeps float32 master weights: it needs dtype float32")
        if products == "numpy":
            raise ValueError("precision bf16-mixed needs products torch (NumPy has no bfloat16 matrix product)")
        return "torch"
    return "numpy" if products == "auto" else products


def make_products(products: str = "auto", precision: str = "full", dtype: np.dtype | str = "float32"):
    """The backend object for the chosen library and precision.

    Raises ValueError for an impossible combination, MissingExtraError when PyTorch is needed and
    missing, UnsupportedCPUError for bf16-mixed on a CPU without AVX-512 BF16 or AMX.
    """
    name = resolve(products, precision, np.dtype(dtype))
    if name == "numpy":
        return NumpyProducts()
    if precision == "bf16-mixed":
        torch = _import_torch("model.precision = bf16-mixed")
        check_bf16_cpu()
        return TorchBF16Products(torch)
    return TorchProducts(_import_torch("model.products = torch"))


class NumpyProducts:
    """The products through ``np.matmul(..., out=)``: NumPy's BLAS (OpenBLAS), in the model's dtype."""

    name = "numpy"
    precision = "full"

    def describe(self) -> str:
        return "NumPy BLAS, model dtype"

    def fuses(self, activation: str) -> bool:
        """Does this backend compute hidden layers with ``activation`` itself (``hidden_forward``)? No."""
        return False

    def forward(self, l: int, a: np.ndarray, W: np.ndarray, out: np.ndarray) -> None:
        """out (n, out) = a (n, in) @ W.T; W is (out, in)."""
        np.matmul(a, W.T, out=out)

    def weight_grad(self, l: int, delta: np.ndarray, a_prev: np.ndarray, out: np.ndarray) -> None:
        """out (out, in) = delta.T @ a_prev, the sum over the rows of the per-sample gradients."""
        np.matmul(delta.T, a_prev, out=out)

    def backprop(self, l: int, delta: np.ndarray, W: np.ndarray, out: np.ndarray) -> None:
        """out (n, in) = delta (n, out) @ W (out, in)."""
        np.matmul(delta, W, out=out)


def _view(torch, a: np.ndarray):
    """A zero-copy tensor over ``a`` (read-only arrays, e.g. memory-mapped data, are only read)."""
    if a.flags.writeable:
        return torch.from_numpy(a)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable tensor": we never write through it
        return torch.from_numpy(a)


class TorchProducts:
    """The products through ``torch.matmul(..., out=)`` on zero-copy views (``torch.from_numpy``), model dtype.

    PyTorch's CPU matmul uses its bundled MKL/oneDNN with its own threads: ``dpbp.threads``
    sets them to the per-rank BLAS thread count.
    """

    name = "torch"
    precision = "full"

    def __init__(self, torch):
        self.torch = torch

    def describe(self) -> str:
        return f"PyTorch {self.torch.__version__} (oneDNN/MKL), model dtype"

    def fuses(self, activation: str) -> bool:
        return False

    def forward(self, l, a, W, out):
        t = self.torch
        t.matmul(_view(t, a), _view(t, W).T, out=t.from_numpy(out))

    def weight_grad(self, l, delta, a_prev, out):
        t = self.torch
        t.matmul(t.from_numpy(delta).T, _view(t, a_prev), out=t.from_numpy(out))

    def backprop(self, l, delta, W, out):
        t = self.torch
        t.matmul(t.from_numpy(delta), _view(t, W), out=t.from_numpy(out))


def _relu_forward(torch, z):
    torch.relu_(z)


def _relu_backward(torch, a, delta):
    torch.ops.aten.threshold_backward.grad_input(delta, a, 0, grad_input=delta)  # delta * [a > 0]


def _leaky_relu_forward(torch, z):
    torch.nn.functional.leaky_relu_(z, LEAKY_SLOPE)


def _leaky_relu_backward(torch, a, delta):
    torch.ops.aten.leaky_relu_backward.grad_input(delta, a, LEAKY_SLOPE, True, grad_input=delta)


def _identity(torch, *arrays):
    pass


# Hidden activations a bf16-mixed pass computes on bf16 tensors, (forward(z) in place, backward(a, delta)
# in place), as ``dpbp.ops.ACTIVATIONS`` does in the model dtype. Only piecewise-linear ones: relu and
# identity give on a bf16 value exactly what the float32 path gives once rounded for the next product;
# leaky_relu's negative side (0.01 z, 0.01 delta) is rounded once more (one bf16 ulp, within the bound).
# tanh and sigmoid stay on the float32 element-wise path (their derivative from a rounded activation
# would lose bits that the float32 path keeps).
BF16_ACTIVATIONS = {
    "relu": (_relu_forward, _relu_backward),
    "leaky_relu": (_leaky_relu_forward, _leaky_relu_backward),
    "identity": (_identity, _identity),
}


def _key(a: np.ndarray) -> tuple[int, tuple[int, ...]]:
    """Where an array's data is and its shape: recognises the same buffer passed again."""
    return a.__array_interface__["data"][0], a.shape


class TorchBF16Products(TorchProducts):
    """bf16-mixed: bfloat16 inputs, float32 accumulation, one bfloat16 rounding of each result.

    Call order within one forward+backprop over the same rows (the model's): ``forward(l)`` (or
    ``hidden_forward(l)``) for every layer, then per layer ``weight_grad(l)``, the bias gradient
    and ``backprop(l)`` (or ``hidden_backprop(l)``). ``forward(l)`` casts W and the layer's input;
    ``weight_grad(l)`` reuses that input copy and casts delta; ``backprop(l)`` reuses delta's and
    W's copies. A buffer that is not the one cast before is cast again, so a call out of that
    order is slower, never wrong, as long as the arrays were not written to in between (the model
    never does).

    Hidden layers whose activation is in ``BF16_ACTIVATIONS`` (without batch norm or dropout, the
    model's choice) stay in bf16 from one product to the next, as under ``torch.autocast``:
    ``hidden_forward`` returns ``g(bf16(A W^T + b))`` as a kept bf16 tensor (one rounding after
    the bias, inside the kernel), which the next layer's ``forward``, ``weight_grad`` and
    ``hidden_backprop`` take as it is; ``hidden_backprop`` returns ``bf16(delta W) * g'``, also a
    kept tensor. No float32 copy of those activations or deltas exists: the output layer's
    ``Z`` and every gradient are float32 in the caller's buffers.
    """

    precision = "bf16-mixed"
    # bf16 scratch tensors kept per layer, by role (W, B, A, Z, G, S, D, P) and shape: a step's shard and an
    # epoch's shorter last batch need 16; a run that keeps meeting new shapes starts over past this.
    BUFFERS_PER_LAYER = 24

    def __init__(self, torch):
        super().__init__(torch)
        self._buffers: dict[tuple, object] = {}
        self._w16: dict[int, tuple] = {}  # layer -> (key of W, bf16 copy)
        self._a16: dict[int, tuple] = {}  # layer -> (key of the input, bf16 copy)
        self._d16: tuple | None = None  # (layer, key of delta, bf16 copy)
        self._layers = 1  # layers seen so far: the cache's bound grows with the network's depth

    def describe(self) -> str:
        return f"PyTorch {self.torch.__version__} (oneDNN/MKL), bf16 inputs with float32 accumulation"

    def fuses(self, activation: str) -> bool:
        """True for the activations whose hidden layers this backend keeps in bf16 (``BF16_ACTIVATIONS``)."""
        return activation in BF16_ACTIVATIONS

    def _buffer(self, role: str, l: int, shape: tuple[int, ...]):
        key = (role, l, shape)
        buf = self._buffers.get(key)
        if buf is None:
            self._layers = max(self._layers, l + 1)
            if len(self._buffers) >= self.BUFFERS_PER_LAYER * self._layers:
                self._buffers.clear()
                self._w16.clear()
                self._a16.clear()
                self._d16 = None
            buf = self._buffers[key] = self.torch.empty(shape, dtype=self.torch.bfloat16)
        return buf

    def _cast(self, role: str, l: int, a: np.ndarray):
        """A bf16 copy of ``a`` (round to nearest even) in a kept buffer."""
        buf = self._buffer(role, l, a.shape)
        buf.copy_(_view(self.torch, a))
        return buf

    def _weights(self, l: int, W: np.ndarray, *, fresh: bool):
        got = self._w16.get(l)
        if fresh or got is None or got[0] != _key(W):
            got = self._w16[l] = (_key(W), self._cast("W", l, W))
        return got[1]

    def _input(self, l: int, a, *, fresh: bool):
        """Layer l's input in bf16: a kept tensor as it is; an array cast (``fresh``: always, else unless
        the forward pass cast it)."""
        if isinstance(a, self.torch.Tensor):
            return a
        got = self._a16.get(l)
        if not fresh and got is not None and got[0] == _key(a):
            return got[1]
        a16 = self._cast("A", l, a)
        self._a16[l] = (_key(a), a16)
        return a16

    def _delta(self, l: int, delta, *, fresh: bool):
        """delta in bf16: a kept tensor as it is; an array cast (``fresh``: always, else unless cast just before)."""
        if isinstance(delta, self.torch.Tensor):
            return delta
        got = self._d16
        if not fresh and got is not None and got[:2] == (l, _key(delta)):
            return got[2]
        d16 = self._cast("D", l, delta)
        self._d16 = (l, _key(delta), d16)
        return d16

    def forward(self, l, a, W, out):
        t = self.torch
        w16 = self._weights(l, W, fresh=True)  # once per forward pass: the weights changed since the last step
        a16 = self._input(l, a, fresh=True)
        z16 = self._buffer("Z", l, out.shape)
        t.matmul(a16, w16.T, out=z16)
        t.from_numpy(out).copy_(z16)

    def hidden_forward(self, l: int, a, W: np.ndarray, b: np.ndarray, activation: str):
        """Hidden layer l: ``g(A W^T + b)`` as a kept bf16 ``(n, out)`` tensor (valid until the next pass).

        ``a``: ``(n, in)`` float32 array (the input rows) or the previous ``hidden_forward``'s
        tensor; ``W`` ``(out, in)``, ``b`` ``(out,)`` float32. The bias is rounded to bf16 and added
        inside the product's float32 accumulation (``addmm``), so the result is rounded once.
        """
        t = self.torch
        w16 = self._weights(l, W, fresh=True)
        a16 = self._input(l, a, fresh=True)
        z16 = self._buffer("Z", l, (a16.shape[0], W.shape[0]))
        t.addmm(self._cast("B", l, b), a16, w16.T, out=z16)
        BF16_ACTIVATIONS[activation][0](t, z16)
        return z16

    def weight_grad(self, l, delta, a_prev, out):
        t = self.torch
        g16 = self._buffer("G", l, out.shape)
        t.matmul(self._delta(l, delta, fresh=True).T, self._input(l, a_prev, fresh=False), out=g16)
        t.from_numpy(out).copy_(g16)

    def bias_grad(self, l: int, delta, out: np.ndarray) -> None:
        """out ``(width,)`` float32 = the column sums of a bf16 ``delta`` tensor ``(n, width)``.

        Like a product (ones^T delta): added in float32 inside the kernel, rounded to bf16 once
        (3x faster than a float32 result), then written into the float32 buffer.
        """
        t = self.torch
        s16 = self._buffer("S", l, out.shape)
        t.sum(delta, 0, out=s16)
        t.from_numpy(out).copy_(s16)

    def _backprop16(self, l: int, delta, W: np.ndarray, n: int):
        """``bf16(delta W)`` ``(n, in)`` in layer l's kept buffer, from the copies ``weight_grad(l)`` made."""
        p16 = self._buffer("P", l, (n, W.shape[1]))
        self.torch.matmul(self._delta(l, delta, fresh=False), self._weights(l, W, fresh=False), out=p16)
        return p16

    def backprop(self, l, delta, W, out):
        self.torch.from_numpy(out).copy_(self._backprop16(l, delta, W, out.shape[0]))

    def hidden_backprop(self, l: int, delta, W: np.ndarray, a, activation: str):
        """delta of hidden layer l - 1 as a kept bf16 ``(n, in)`` tensor: ``bf16(delta W) * g'``, where
        ``a`` is that layer's ``hidden_forward`` tensor (g' is read from the activations, as
        ``dpbp.ops`` does). ``delta``: ``(n, out)`` float32 array or a ``hidden_backprop`` tensor."""
        p16 = self._backprop16(l, delta, W, a.shape[0])
        BF16_ACTIVATIONS[activation][1](self.torch, a, p16)
        return p16
