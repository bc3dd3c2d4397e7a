"""Optimizers and learning-rate schedules over flat parameter vectors.

Each optimizer updates ``params`` in place from ``grads`` (both 1-D, same dtype)
and keeps its state as flat arrays of that dtype, so a checkpoint can save and
restore it exactly. ``step`` uses ``grads`` as scratch space (its contents are
undefined afterwards): that keeps every step free of parameter-sized allocations.
Hyper-parameters are held as Python floats, which NumPy 2 treats as weak scalars:
a float32 model stays float32.

Finite gradients never overflow the update: a chunk whose squares sum to more than half
the dtype's max (float32: some |g| > 1.3e19, near where Adam's and RMSprop's g^2 is Inf)
is updated by the same formulas in a wider dtype (float64 for float32) and rounded back
once. The optimizer state is then saturated at ``np.finfo(dtype).max`` where its exact
value does not fit (Adam's and RMSprop's running mean of g^2 from |g| above ~1e21 in
float32): that update is exact, later ones use the saturated, smaller value. Parameters
are never saturated: an update that takes one beyond the dtype's range leaves it Inf.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Elements per update chunk: measured best of 2^13..2^21 for Adam on 1.9M float32 parameters
# (scripts/bench); the four vectors of a chunk (params, grads, two state) stay in L2/L3.
CHUNK_ELEMENTS = 1 << 17
# The dtype a chunk is updated in when its squares overflow (see the module docstring).
# longdouble is wider than float64 on x86-64 Linux; where it is not, float64 state saturates.
WIDER = {np.dtype(np.float16): np.dtype(np.float64), np.dtype(np.float32): np.dtype(np.float64),
         np.dtype(np.float64): np.dtype(np.longdouble)}
SCHEDULES = ("constant", "step", "cosine", "plateau")
# ReduceLROnPlateau's eps (torch's default): a reduction of the learning rate by less than this is not made.
PLATEAU_EPS = 1e-8


def all_finite(x: np.ndarray) -> bool:
    """True when no entry of the 1-D array ``x`` is NaN or Inf.

    Fast path: one BLAS dot product (NaN/Inf anywhere make it non-finite; 3x faster
    than ``np.sum``). A finite dot proves the answer; a non-finite one may also come
    from squares overflowing, so only then is every entry checked.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        return math.isfinite(float(np.dot(x, x))) or bool(np.isfinite(x).all())


class Optimizer:
    """Base class: ``step(params, grads, lr)`` and exact state round-trips.

    ``weight_decay`` (wd >= 0) follows PyTorch: for sgd, momentum and rmsprop it is L2
    regularisation, ``g <- g + wd * W`` before the update (``torch.optim.SGD``/``RMSprop``
    with ``weight_decay``); for adam it is decoupled, ``W <- W (1 - lr wd)`` before the Adam
    step (``torch.optim.AdamW``).
    """

    name = ""
    state_names: tuple[str, ...] = ()
    decoupled = False  # weight decay applied to W directly (AdamW) instead of added to the gradient (L2)

    def __init__(self, n_params: int, dtype="float32", weight_decay: float = 0.0):
        self.n_params = int(n_params)
        self.dtype = np.dtype(dtype)
        self.t = 0  # updates applied so far
        self.state = {k: np.zeros(self.n_params, self.dtype) for k in self.state_names}
        self.weight_decay = float(weight_decay)
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        # A chunk whose dot(g, g) is at most this takes the in-place path (see ``step``).
        self.safe_squares = float(np.finfo(self.dtype).max) / 2
        self._l2 = self.weight_decay > 0 and not self.decoupled
        # scratch: one chunk (rmsprop's g^2, the L2 term wd * W)
        self._scratch = (np.empty(min(self.n_params, CHUNK_ELEMENTS), self.dtype)
                         if self._l2 or self.needs_scratch else None)

    needs_scratch = False

    def step(self, params: np.ndarray, grads: np.ndarray, lr: float, *, grad_scale: float = 1.0,
             span: tuple[int, int] | None = None, squares: float | None = None) -> None:
        """Apply one update in place. ``grads`` (times ``grad_scale``) is the batch-mean gradient; clobbered.

        ``params``: ``(n_params,)``; ``grads``: ``(hi - lo,)`` for ``span=(lo, hi)`` (default the
        whole vector), both of the optimizer's dtype. Updates ``params[lo:hi]`` and that part
        of the state (a rank updating its own span of shared parameters), increments ``t``.
        Works through the vectors in cache-sized chunks: an update is a dozen
        element-wise passes, and doing all of them (including the scaling of a
        gradient sum into a mean) on a chunk while it sits in cache, instead of
        streaming every pass through memory, makes Adam about twice as fast.
        Each chunk's ``dot(g, g)`` (one BLAS pass) picks the path: at most half the
        dtype's max, the update runs in place in the working dtype, where no state can
        overflow (each is ``b * state + x`` with ``b < 1`` and ``|x|`` at most
        ``(1 - b) * max / 2`` or far below); larger, NaN or Inf, in ``WIDER[dtype]`` with
        the state saturated (see the module docstring). ``squares``: the squared norm of
        ``grads * grad_scale`` when the caller knows it already (the trainer's per-layer
        norms): at most half the dtype's max, no chunk can exceed it and the dots are skipped.
        """
        lo, hi = span if span is not None else (0, self.n_params)
        if params.shape != (self.n_params,) or grads.shape != (hi - lo,) or not 0 <= lo <= hi <= self.n_params:
            raise ValueError(f"params must have shape ({self.n_params},) and grads ({hi - lo},)")
        self.t += 1
        lr, scale, wd = float(lr), float(grad_scale), self.weight_decay
        known_safe = not self._l2 and squares is not None and squares <= self.safe_squares  # False for NaN
        for start in range(lo, hi, CHUNK_ELEMENTS):
            part = slice(start, min(start + CHUNK_ELEMENTS, hi))
            g = grads[start - lo : part.stop - lo]
            p = params[part]
            scratch = self._scratch[: g.shape[0]] if self._scratch is not None else None
            if scale != 1.0:
                g *= scale
            if self._l2:  # g <- g + wd W
                with np.errstate(over="ignore", invalid="ignore"):
                    np.multiply(p, wd, out=scratch)
                    g += scratch
            if not known_safe:
                with np.errstate(over="ignore", invalid="ignore"):
                    chunk_squares = float(np.dot(g, g))  # NaN/Inf: a NaN/Inf entry, or a square beyond the dtype
            state = {k: v[part] for k, v in self.state.items()}
            if known_safe or chunk_squares <= self.safe_squares:  # False for NaN
                self._update(p, g, lr, state, scratch)
            else:
                self._update_wide(p, g, lr, state)

    def _update(self, params: np.ndarray, grads: np.ndarray, lr: float, state: dict, scratch) -> None:
        """Update one chunk: ``params``/``grads``/``state`` values/``scratch`` are aligned slices.

        Written with in-place NumPy calls and Python-float scalars, so the same code runs
        in whatever dtype the arrays have (``_update_wide`` passes wider copies).
        """
        raise NotImplementedError

    def _update_wide(self, params: np.ndarray, grads: np.ndarray, lr: float, state: dict) -> None:
        """``_update`` of one chunk computed in ``WIDER[dtype]`` and rounded back once.

        For chunks whose g^2 overflows the working dtype (rare: it allocates chunk-sized
        copies). State that does not fit is saturated at +-finfo(dtype).max; a parameter
        that does not fit becomes +-Inf (the trainer then stops naming the step).
        """
        wide = WIDER.get(self.dtype, self.dtype)
        p, g = params.astype(wide), grads.astype(wide)
        s = {k: v.astype(wide) for k, v in state.items()}
        scratch = np.empty_like(g) if self._scratch is not None else None
        limit = float(np.finfo(self.dtype).max)
        with np.errstate(over="ignore", invalid="ignore"):
            self._update(p, g, lr, s, scratch)
            for k, v in s.items():
                np.clip(v, -limit, limit, out=v)  # saturate: the exact value does not fit the dtype
                np.copyto(state[k], v, casting="same_kind")
            np.copyto(params, p, casting="same_kind")

    def move_state(self, buffers: dict[str, np.ndarray], *, copy: bool = True) -> None:
        """Keep each state vector in ``buffers[name]`` (e.g. node-shared memory) from now on.

        ``copy`` writes the current values there first (one of the sharing processes does it).
        """
        if set(buffers) != set(self.state_names):
            raise ValueError(f"{self.name} state needs buffers {sorted(self.state_names)}, got {sorted(buffers)}")
        for k, buf in buffers.items():
            if buf.shape != (self.n_params,) or buf.dtype != self.dtype:
                raise ValueError(f"state buffer {k!r} must be a ({self.n_params},) {self.dtype} array")
            if copy:
                buf[...] = self.state[k]
            self.state[k] = buf

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the state arrays plus ``t`` as a 0-d int64 array."""
        out = {k: v.copy() for k, v in self.state.items()}
        out["t"] = np.array(self.t, np.int64)
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore exactly what ``state_dict`` returned; raise ValueError on a mismatch."""
        expected = set(self.state_names) | {"t"}
        if set(state) != expected:
            raise ValueError(f"{self.name} state needs {sorted(expected)}, got {sorted(state)}")
        for k in self.state_names:
            v = np.asarray(state[k])
            if v.shape != (self.n_params,) or v.dtype != self.dtype:
                raise ValueError(
                    f"{self.name} state {k!r} must be ({self.n_params},) {self.dtype}, got {v.shape} {v.dtype}"
                )
            self.state[k][...] = v
        self.t = int(state["t"])


class SGD(Optimizer):
    """Plain gradient descent: W <- W - lr * g (g: dL/dW, plus wd W with weight decay)."""

    name = "sgd"

    def _update(self, params, grads, lr, state, scratch):
        grads *= lr
        params -= grads


class Momentum(Optimizer):
    """Heavy-ball momentum v <- mu v + g; W <- W - lr v (Nesterov: W <- W - lr (g + mu v)); PyTorch's SGD."""

    name = "momentum"
    state_names = ("velocity",)

    def __init__(self, n_params, dtype="float32", momentum: float = 0.9, nesterov: bool = False,
                 weight_decay: float = 0.0):
        super().__init__(n_params, dtype, weight_decay)
        self.momentum, self.nesterov = float(momentum), bool(nesterov)

    def _update(self, params, grads, lr, state, scratch):
        v = state["velocity"]
        v *= self.momentum
        v += grads
        if self.nesterov:
            grads *= lr
            params -= grads
            np.multiply(v, lr * self.momentum, out=grads)
        else:
            np.multiply(v, lr, out=grads)
        params -= grads


class RMSprop(Optimizer):
    """s <- rho s + (1 - rho) g^2; W <- W - lr g / (sqrt(s) + eps) (PyTorch's RMSprop, alpha = rho)."""

    name = "rmsprop"
    state_names = ("square_avg",)
    needs_scratch = True  # one chunk's g^2

    def __init__(self, n_params, dtype="float32", rho: float = 0.9, eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(n_params, dtype, weight_decay)
        self.rho, self.eps = float(rho), float(eps)

    def _update(self, params, grads, lr, state, scratch):
        s, tmp = state["square_avg"], scratch
        np.multiply(grads, math.sqrt(1.0 - self.rho), out=tmp)  # fold (1 - rho) in before squaring
        np.square(tmp, out=tmp)
        s *= self.rho
        s += tmp  # s <- rho s + (1 - rho) g^2
        np.sqrt(s, out=tmp)
        tmp += self.eps
        np.divide(grads, tmp, out=grads)
        grads *= lr
        params -= grads


class Adam(Optimizer):
    """Adam with bias correction; ``weight_decay`` is decoupled (AdamW): W <- W (1 - lr wd) first."""

    name = "adam"
    state_names = ("m", "v")
    decoupled = True

    def __init__(self, n_params, dtype="float32", beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(n_params, dtype, weight_decay)
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)

    def _update(self, params, grads, lr, state, scratch):
        m, v = state["m"], state["v"]
        if self.weight_decay:
            params *= 1.0 - lr * self.weight_decay
        b1, b2 = self.beta1, self.beta2
        grads *= 1.0 - b1
        m *= b1
        m += grads  # m <- b1 m + (1 - b1) g
        grads *= math.sqrt(1.0 - b2) / (1.0 - b1)  # fold (1 - b2) in before squaring
        np.square(grads, out=grads)
        v *= b2
        v += grads  # v <- b2 v + (1 - b2) g^2
        # lr * m_hat / (sqrt(v_hat) + eps) with m_hat = m / bc1, v_hat = v / bc2, folded into scalars.
        bc1 = 1.0 - b1**self.t
        bc2 = 1.0 - b2**self.t
        np.sqrt(v, out=grads)
        grads *= 1.0 / math.sqrt(bc2)
        grads += self.eps
        np.divide(m, grads, out=grads)
        grads *= lr / bc1
        params -= grads


OPTIMIZER_CLASSES = {cls.name: cls for cls in (SGD, Momentum, RMSprop, Adam)}  # the config's train.optimizer
OPTIMIZERS = tuple(OPTIMIZER_CLASSES)


def make_optimizer(name: str, n_params: int, dtype="float32", **hyper) -> Optimizer:
    """Build an optimizer by name; ``hyper`` holds only the keywords that optimizer takes."""
    if name not in OPTIMIZER_CLASSES:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZER_CLASSES[name](n_params, dtype, **hyper)


@dataclass
class Plateau:
    """The state of a reduce-on-plateau schedule: what a checkpoint must hold to continue it exactly.

    The fields of ``torch.optim.lr_scheduler.ReduceLROnPlateau`` (``best``, ``num_bad_epochs``,
    ``cooldown_counter``) plus ``reductions``, the number of times the rate was reduced (tried:
    one at ``min_lr`` changes nothing); the current rate follows from it and the config.
    """

    best: float = math.inf  # the lowest monitored value that counted as an improvement
    num_bad_epochs: int = 0  # epochs since then (kept at 0 during a cooldown)
    cooldown_counter: int = 0  # epochs left during which bad epochs are not counted
    reductions: int = 0

    def to_json(self) -> dict:
        """A JSON-safe dict (``best`` None while infinite)."""
        return {"best": None if math.isinf(self.best) else self.best, "num_bad_epochs": self.num_bad_epochs,
                "cooldown_counter": self.cooldown_counter, "reductions": self.reductions}

    @classmethod
    def from_json(cls, d: dict) -> Plateau:
        """Inverse of ``to_json``; ValueError/TypeError on a malformed dict."""
        best = math.inf if d["best"] is None else float(d["best"])
        counts = [d[k] for k in ("num_bad_epochs", "cooldown_counter", "reductions")]
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise ValueError(f"plateau counters must be integers >= 0, got {counts}")
        return cls(best, *counts)


class LRSchedule:
    """The learning rate of each update: a function of the global step and, for ``plateau``, its ``Plateau`` state.

    ``kind``: ``constant``; ``step`` (multiply by ``gamma`` every ``step_size`` steps);
    ``cosine`` (from ``base_lr`` down to ``min_lr`` over ``total_steps``); ``plateau``
    (``torch.optim.lr_scheduler.ReduceLROnPlateau`` in mode ``min``, ``threshold_mode="abs"``:
    ``observe`` is given the validation loss after every epoch, and once it has not fallen below
    ``best - threshold`` for more than ``patience`` epochs the rate becomes
    ``max(lr * gamma, min_lr)``, unless that changes it by no more than ``PLATEAU_EPS``; then
    ``cooldown`` epochs pass before bad epochs count again). A linear warm-up over the first
    ``warmup_steps`` updates ramps to the scheduled value (for ``plateau``: to its current rate).
    Only ``plateau`` has state (``self.plateau``, checkpointed); the others need only the step.
    """

    def __init__(self, base_lr: float, kind: str = "constant", *, total_steps: int = 1,
                 warmup_steps: int = 0, step_size: int = 1, gamma: float = 0.1, min_lr: float = 0.0,
                 patience: int = 10, cooldown: int = 0, threshold: float = 0.0):
        if kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {kind!r}; expected one of {', '.join(SCHEDULES)}")
        if base_lr <= 0:
            raise ValueError(f"learning rate must be > 0, got {base_lr}")
        if kind == "plateau" and not 0 < gamma < 1:
            raise ValueError(f"the plateau schedule's factor (gamma) must be in (0, 1), got {gamma}")
        self.base_lr, self.kind = float(base_lr), kind
        self.total_steps, self.warmup_steps = max(1, int(total_steps)), max(0, int(warmup_steps))
        self.step_size, self.gamma, self.min_lr = max(1, int(step_size)), float(gamma), float(min_lr)
        self.patience, self.cooldown, self.threshold = int(patience), int(cooldown), float(threshold)
        self.plateau = Plateau() if kind == "plateau" else None
        self._reduced = (0, self.base_lr)  # (reductions, the rate after them): computed once per reduction

    def __call__(self, step: int) -> float:
        """Learning rate for the update with 0-based index ``step``."""
        if self.kind == "step":
            lr = self.base_lr * self.gamma ** (step // self.step_size)
        elif self.kind == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, max(0.0, (step - self.warmup_steps) / span))
            lr = self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))
        elif self.kind == "plateau":
            lr = self.plateau_lr()
        else:
            lr = self.base_lr
        if step < self.warmup_steps:
            lr *= (step + 1) / self.warmup_steps
        return lr

    def plateau_lr(self) -> float:
        """The plateau schedule's current rate: ``base_lr`` after ``plateau.reductions`` reductions.

        Each reduction is torch's: ``new = max(old * gamma, min_lr)``, taken only when
        ``old - new > PLATEAU_EPS``; so the same floats as a rate kept and reduced in place.
        """
        done, lr = self._reduced
        if self.plateau.reductions < done:
            done, lr = 0, self.base_lr
        for _ in range(self.plateau.reductions - done):
            new = max(lr * self.gamma, self.min_lr)
            if lr - new > PLATEAU_EPS:
                lr = new
        self._reduced = (self.plateau.reductions, lr)
        return lr

    def observe(self, metric: float) -> bool:
        """End of an epoch with validation loss ``metric`` (plateau only): update the state; True if it reduced.

        ``torch.optim.lr_scheduler.ReduceLROnPlateau.step`` (mode min, threshold_mode abs).
        NaN never counts as an improvement. Call with the same value on every rank.
        """
        p = self.plateau
        if metric < p.best - self.threshold:
            p.best, p.num_bad_epochs = float(metric), 0
        else:
            p.num_bad_epochs += 1
        if p.cooldown_counter > 0:
            p.cooldown_counter -= 1
            p.num_bad_epochs = 0  # bad epochs during a cooldown are not counted
        if p.num_bad_epochs > self.patience:
            before = self.plateau_lr()
            p.reductions += 1
            p.cooldown_counter, p.num_bad_epochs = self.cooldown, 0
            return self.plateau_lr() != before
        return False
