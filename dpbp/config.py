"""The run configuration: one typed, validated config for a whole training run.

Owns the section dataclasses (``[model]``, ``[data]``, ``[train]``, ``[checkpoint]``,
``[run]``), reading them from TOML, ``section.key=value`` overrides, validation, a TOML
emitter, a stable hash and a generated Markdown reference.

Each field's ``metadata`` is the single source of truth: ``help`` (one line) and the
rules validation enforces and ``doc_markdown`` prints:

* ``choices``: allowed string values;
* ``min`` / ``max``: inclusive bounds;
* ``min_exclusive`` / ``max_exclusive``: strict bounds;
* ``min_len`` / ``item_min``: list length and per-item lower bound;
* ``empty_ok``: an empty list is allowed besides lists of ``min_len`` or more entries;
* ``nonempty``: the string may not be empty;
* ``int_as_str``: an integer is accepted and stored as its decimal string;
* ``bool_as_str``: a boolean is accepted and stored as ``"true"`` or ``"false"``;
* ``each``: a field that takes a number or a list of them applies the bounds to every entry.

Rules that relate two fields live in ``_CROSS_CHECKS`` together with their doc text.
Every problem raises :class:`dpbp.errors.ConfigError` with the dotted key. The choices of the
activations, losses, outputs, initialisations, dtypes, optimizers, schedules and normalisers
are the names of the tables that implement them (``dpbp.ops``, ``dpbp.model``, ``dpbp.optim``,
``dpbp.data``), so the config can allow nothing that does not exist and refuse nothing that does;
the loss/output pairing is ``dpbp.ops.check_pairing``'s.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import math
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dpbp import data as _data
from dpbp import model as _model
from dpbp import ops as _ops
from dpbp import optim as _optim
from dpbp import products as _products
from dpbp.errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "CheckpointConfig",
    "Config",
    "DataConfig",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "config_hash",
    "default_config",
    "doc_markdown",
    "field_help",
    "from_dict",
    "load_config",
    "replace",
    "to_dict",
    "to_toml",
    "validate",
]


def _meta(help: str, **rules: Any) -> dict[str, Any]:
    """Field metadata: a one-line ``help`` plus the validation rules listed above."""
    return {"help": help, **rules}


@dataclass(frozen=True)
class ModelConfig:
    """``[model]``: network shape, activations, loss and numeric precision."""

    layers: list[int] = field(
        default_factory=list,
        metadata=_meta(
            "full layer sizes [n_in, hidden..., n_out], checked against the data (n_in: its features, "
            "n_out: its classes or target columns); empty: model.hidden between the data's widths",
            min_len=2,
            empty_ok=True,
            item_min=1,
        ),
    )
    hidden: list[int] = field(
        default_factory=lambda: [128, 128],
        metadata=_meta(
            "hidden layer sizes; the input width is the data's feature count and the output width its "
            "class or target column count (shown at start-up); [] for none; give this or model.layers",
            item_min=1,
        ),
    )
    activation: str = field(
        default="relu",
        metadata=_meta(
            "hidden-layer activation",
            choices=_ops.HIDDEN_ACTIVATIONS,
        ),
    )
    output: str = field(
        default="softmax",
        metadata=_meta(
            "output-layer activation", choices=_ops.OUTPUT_ACTIVATIONS
        ),
    )
    loss: str = field(
        default="cross_entropy",
        metadata=_meta(
            "training loss, which sets the task: cross_entropy (softmax output) classifies class labels; "
            "binary_cross_entropy (sigmoid) fits 0/1 or soft targets; mse fits numeric targets (a regression; "
            "over a softmax: class labels); mse is 1/2 sum_j (a_j - y_j)^2 per sample",
            choices=_ops.LOSSES,
        ),
    )
    init: str = field(
        default="auto",
        metadata=_meta(
            "weight init; auto: he for relu-like activations, xavier otherwise",
            choices=_model.INITS,
        ),
    )
    dtype: str = field(
        default="float32",
        metadata=_meta(
            "floating-point type of parameters and data", choices=_model.DTYPES
        ),
    )
    dropout: float | list[float] = field(
        default=0.0,
        metadata=_meta(
            "inverted dropout of the hidden layers' activations in training (off in evaluation): one rate for "
            "all, or a list with one per hidden layer; each unit's mask depends on the seed, epoch, step, its "
            "row's place in the global batch, layer and unit, so N ranks train as 1; 0: off",
            min=0.0,
            max_exclusive=1.0,
            each=True,
        ),
    )
    batch_norm: bool = field(
        default=False,
        metadata=_meta(
            "batch normalization of every hidden layer's pre-activation over the global batch (statistics "
            "summed across ranks in float64), with a learned scale and shift; evaluation uses running "
            "statistics (momentum 0.1), saved with checkpoints and models"
        ),
    )
    precision: str = field(
        default="full",
        metadata=_meta(
            "precision of the matrix products: full (in model.dtype) or bf16-mixed (model.dtype float32: "
            "bfloat16 inputs with float32 accumulation; relu/leaky_relu/identity hidden layers without "
            "dropout or batch norm stay bfloat16 between the products; weights, gradients, exchange, loss "
            "and update stay float32; needs PyTorch and a CPU with AVX-512 BF16 or AMX)",
            choices=_products.PRECISIONS,
        ),
    )
    products: str = field(
        default="auto",
        metadata=_meta(
            "library for the matrix products: numpy (NumPy's BLAS), torch (PyTorch's CPU matmul on the same "
            "buffers; pip install 'dpbp[torch]'), auto (torch for bf16-mixed, numpy otherwise)",
            choices=_products.PRODUCTS,
        ),
    )


@dataclass(frozen=True)
class DataConfig:
    """``[data]``: where train/val/test sets come from and how they are normalised."""

    train: str = field(
        default="spirals:n=6000,classes=5,turns=1.5",
        metadata=_meta(
            "training data: built-in name, .npz, x.npy,y.npy, .csv, IDX images,labels",
            nonempty=True,
        ),
    )
    val: str = field(
        default="",
        metadata=_meta("validation source; empty: hold out val_fraction of train"),
    )
    val_fraction: float = field(
        default=0.1,
        metadata=_meta(
            "fraction of train held out for validation when val is empty",
            min=0.0,
            max_exclusive=1.0,
        ),
    )
    test: str = field(
        default="",
        metadata=_meta("optional test source evaluated at the end; empty: none"),
    )
    normalize: str = field(
        default="standard",
        metadata=_meta(
            "feature normalisation, fitted in float64 on the training split before the cast to model.dtype",
            choices=_data.NORMALIZERS,
        ),
    )
    normalize_targets: str = field(
        default="auto",
        metadata=_meta(
            "regression targets: standard trains on (y - mean) / std of the training split and reports "
            "outputs and metrics in the original units; auto: standard for loss mse with output identity, "
            "none otherwise",
            choices=("auto", "none", "standard"),
        ),
    )
    label_column: str = field(
        default="last",
        metadata=_meta(
            "table label column: last, first, a 0-based index, or a header name; it may hold text "
            "(class labels)",
            nonempty=True,
            int_as_str=True,
        ),
    )
    header: str = field(
        default="auto",
        metadata=_meta(
            "does a table's first row name its columns? auto: yes when a column holds text there and "
            "numbers below",
            choices=_data.HEADER_MODES,
            bool_as_str=True,
        ),
    )


@dataclass(frozen=True)
class TrainConfig:
    """``[train]``: optimisation, schedule, stopping and run-time behaviour."""

    epochs: int = field(
        default=40, metadata=_meta("number of passes over the training set", min=1)
    )
    batch_size: int = field(
        default=64, metadata=_meta("GLOBAL batch size, summed over all ranks", min=1)
    )
    lr: float = field(
        default=0.01, metadata=_meta("peak learning rate", min_exclusive=0.0)
    )
    optimizer: str = field(
        default="adam",
        metadata=_meta("update rule", choices=_optim.OPTIMIZERS),
    )
    momentum: float = field(
        default=0.9,
        metadata=_meta(
            "momentum coefficient (optimizer = momentum)", min=0.0, max_exclusive=1.0
        ),
    )
    nesterov: bool = field(
        default=False, metadata=_meta("use Nesterov momentum (optimizer = momentum)")
    )
    beta1: float = field(
        default=0.9,
        metadata=_meta("Adam first-moment decay", min=0.0, max_exclusive=1.0),
    )
    beta2: float = field(
        default=0.999,
        metadata=_meta("Adam second-moment decay", min=0.0, max_exclusive=1.0),
    )
    rho: float = field(
        default=0.9,
        metadata=_meta("RMSprop squared-gradient decay", min=0.0, max_exclusive=1.0),
    )
    eps: float = field(
        default=1e-8,
        metadata=_meta("denominator epsilon for rmsprop and adam", min_exclusive=0.0),
    )
    weight_decay: float = field(
        default=0.0,
        metadata=_meta(
            "weight decay wd: L2 for sgd, momentum and rmsprop (g + wd W, as PyTorch's SGD and RMSprop); "
            "decoupled for adam (W (1 - lr wd) first, as PyTorch's AdamW)", min=0.0
        ),
    )
    schedule: str = field(
        default="constant",
        metadata=_meta(
            "learning-rate schedule after warm-up; plateau: multiply the rate by train.gamma (down to "
            "train.min_lr) once the validation loss has not improved by train.min_delta for more than "
            "train.plateau_patience epochs (PyTorch's ReduceLROnPlateau, threshold_mode abs)",
            choices=_optim.SCHEDULES,
        ),
    )
    warmup_epochs: float = field(
        default=0.0,
        metadata=_meta("linear warm-up length in epochs (may be fractional)", min=0.0),
    )
    step_epochs: int = field(
        default=10,
        metadata=_meta("step schedule: decay every this many epochs", min=1),
    )
    gamma: float = field(
        default=0.1,
        metadata=_meta("step schedule: decay factor; plateau: the reduction factor (PyTorch's factor, < 1)",
                       min_exclusive=0.0, max=1.0),
    )
    plateau_patience: int = field(
        default=10,
        metadata=_meta(
            "plateau schedule: epochs without validation improvement tolerated; the rate is reduced after the "
            "next one (PyTorch's patience)", min=0,
        ),
    )
    plateau_cooldown: int = field(
        default=0,
        metadata=_meta(
            "plateau schedule: epochs after a reduction during which epochs without improvement are not counted "
            "(PyTorch's cooldown)", min=0,
        ),
    )
    min_lr: float = field(
        default=0.0,
        metadata=_meta("cosine schedule: final learning rate; plateau: the lowest rate (PyTorch's min_lr); < lr",
                       min=0.0),
    )
    clip_grad_norm: float = field(
        default=0.0,
        metadata=_meta(
            "clip the batch-mean gradient to this global L2 norm (over all layers, before weight decay and the "
            "optimizer: PyTorch's clip_grad_norm_, factor min(1, max / (norm + 1e-6))); 0 disables", min=0.0,
        ),
    )
    seed: int = field(
        default=0,
        metadata=_meta("seeds weight init, validation split and shuffle", min=0),
    )
    shuffle: bool = field(
        default=True, metadata=_meta("reshuffle the training set every epoch")
    )
    early_stopping_patience: int = field(
        default=0,
        metadata=_meta(
            "stop after this many epochs without val loss improvement; 0 disables",
            min=0,
        ),
    )
    min_delta: float = field(
        default=0.0,
        metadata=_meta(
            "smallest val loss decrease that counts as improvement (early stopping, best.npz and the plateau "
            "schedule: PyTorch's threshold with threshold_mode abs)", min=0.0
        ),
    )
    check_sync_every: int = field(
        default=100,
        metadata=_meta(
            "compare a parameter checksum across ranks every K steps (skipped where there is one copy: "
            "node_shared on one node); 0 disables", min=0
        ),
    )
    heartbeat_timeout: float = field(
        default=30.0,
        metadata=_meta(
            "abort the whole job, naming the rank, when a rank sends no heartbeat (TCP, beside MPI) for "
            "this many seconds: its host is down, its network cut or its process frozen; a rank busy "
            "computing, reading or writing keeps beating; 0 disables",
            min=0,
        ),
    )
    collective_timeout: float = field(
        default=300.0,
        metadata=_meta(
            "abort the whole job when every rank has waited inside one MPI collective for this many "
            "seconds (MPI itself is stuck); without heartbeats: when one rank has; 0 disables",
            min=0,
        ),
    )
    node_shared: str = field(
        default="auto",
        metadata=_meta(
            "keep parameters, optimizer state and each rank's gradient sum in one shared-memory window per "
            "node; each rank sums and updates its own span in place, and across nodes reduces only that span "
            "with the ranks holding it on the other nodes (hierarchical); auto: wherever every node runs as "
            "many ranks and /dev/shm has room; on: required; off: one Allreduce per step",
            choices=("auto", "on", "off"),
        ),
    )
    on_nonfinite: str = field(
        default="stop",
        metadata=_meta(
            "on a NaN/inf loss or gradient: stop the run, or skip the step",
            choices=("stop", "skip"),
        ),
    )
    max_skipped_steps: int = field(
        default=20,
        metadata=_meta(
            "with on_nonfinite = skip: stop the run (exit 3) once more than this many updates have been "
            "skipped in it, resumes included",
            min=1,
        ),
    )
    threads: int = field(
        default=0,
        metadata=_meta(
            "BLAS threads per rank; 0 = cores per node / ranks per node", min=0
        ),
    )
    log_every: int = field(
        default=0,
        metadata=_meta("progress line every N steps; 0 = about 10 per epoch", min=0),
    )


@dataclass(frozen=True)
class CheckpointConfig:
    """``[checkpoint]``: when to save and how many checkpoints to keep."""

    every_steps: int = field(
        default=0,
        metadata=_meta("save a checkpoint every N optimizer steps; 0 disables", min=0),
    )
    every_epochs: int = field(
        default=1,
        metadata=_meta("save a checkpoint every N epochs; 0 disables", min=0),
    )
    keep: int = field(
        default=3, metadata=_meta("keep the newest K periodic checkpoints", min=1)
    )
    keep_best: bool = field(
        default=True, metadata=_meta("also keep the checkpoint with the best val loss (best.npz)")
    )
    restore_best: bool = field(
        default=False,
        metadata=_meta(
            "make the final model.npz the best-validation model instead of the last one (Keras' "
            "restore_best_weights); needs keep_best"
        ),
    )


@dataclass(frozen=True)
class RunConfig:
    """``[run]``: where a run's outputs go."""

    dir: str = field(
        default="",
        metadata=_meta(
            "run directory (run.json, config.toml, metrics.jsonl, model.npz, checkpoints/), owned by one "
            "run; empty: a new numbered directory runs/run-NNN (when resuming: the checkpoint's own)",
        ),
    )
    tensorboard: bool = field(
        default=False,
        metadata=_meta(
            "also write the per-epoch metrics and per-layer gradient norms as TensorBoard event files into "
            "<run dir>/tensorboard (rank 0; needs pip install 'dpbp[tensorboard]')"
        ),
    )


@dataclass(frozen=True)
class Config:
    """The whole run configuration; immutable (change copies with :func:`replace`)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)


# Section name -> dataclass, in file order.
_SECTIONS: dict[str, type] = {
    f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)
}


@functools.cache
def _fields(section: str) -> dict[str, tuple[Any, Mapping[str, Any]]]:
    """Field name -> (resolved type, metadata) for one section, in declaration order."""
    cls = _SECTIONS[section]
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f.metadata) for f in dataclasses.fields(cls)}


# --- cross-field rules: (key blamed, doc text, check -> error message or None) ---

def _check_loss_output(cfg: Config) -> str | None:
    allowed = _ops.LOSS_OUTPUTS[cfg.model.loss]  # the pairing rule is dpbp.ops'
    if cfg.model.output in allowed:
        return None
    need = " or ".join(f"'{o}'" for o in allowed)
    return (f"loss '{cfg.model.loss}' needs output = {need}, got output = '{cfg.model.output}'; "
            f"set model.output = {need} or use loss = 'mse'")


def _check_softmax_width(cfg: Config) -> str | None:
    try:
        _ops.check_output_width(cfg.model.output, cfg.model.layers[-1] if cfg.model.layers else 2)
    except ValueError as exc:
        return str(exc)
    return None


def _check_target_scaling(cfg: Config) -> str | None:
    m = cfg.model
    if cfg.data.normalize_targets != "standard" or (m.loss, m.output) == ("mse", "identity"):
        return None
    return (f"'standard' scales regression targets: it needs loss = 'mse' with output = 'identity', "
            f"got loss = '{m.loss}', output = '{m.output}'")


def _check_min_lr(cfg: Config) -> str | None:
    if cfg.train.min_lr < cfg.train.lr:
        return None
    return f"must be < train.lr = {cfg.train.lr!r}, got {cfg.train.min_lr!r}"


def _check_plateau_validation(cfg: Config) -> str | None:
    if cfg.train.schedule != "plateau" or cfg.data.val or cfg.data.val_fraction > 0:
        return None
    return ("'plateau' is driven by the validation loss, and there is no validation data: set data.val or "
            "data.val_fraction > 0")


def _check_plateau_factor(cfg: Config) -> str | None:
    if cfg.train.schedule != "plateau" or cfg.train.gamma < 1:
        return None
    return "1.0 would never reduce the learning rate of the plateau schedule: give a factor < 1 (e.g. 0.1)"


def _check_plateau_patience(cfg: Config) -> str | None:
    t = cfg.train
    if t.schedule != "plateau" or not t.early_stopping_patience or t.early_stopping_patience > t.plateau_patience + 1:
        return None
    # Both count epochs without an improvement of the same validation loss by train.min_delta.
    return (f"{t.plateau_patience} would change nothing: early stopping (train.early_stopping_patience = "
            f"{t.early_stopping_patience}) ends the run before the plateau schedule reduces the rate, after "
            f"{t.plateau_patience + 1} epochs without improvement; set train.early_stopping_patience > "
            f"{t.plateau_patience + 1} or lower train.plateau_patience")


def _check_heartbeat_timeout(cfg: Config) -> str | None:
    t = cfg.train.heartbeat_timeout
    if t == 0 or t >= 1:
        return None
    # Under a second, a busy node's scheduling delays would pass for dead ranks.
    return f"must be 0 (off) or at least 1 second, got {t!r}"


def _check_dropout_rates(cfg: Config) -> str | None:
    rates, hidden = cfg.model.dropout, cfg.model.hidden
    if not isinstance(rates, list) or len(rates) == len(hidden):
        return None
    return (f"{rates} gives {len(rates)} rate(s) for {len(hidden)} hidden layer(s) (model.hidden = {hidden}); "
            "give one rate for all, or one per hidden layer")


def _check_precision(cfg: Config) -> str | None:
    if cfg.model.precision != "bf16-mixed" or cfg.model.dtype == "float32":
        return None
    return f"bf16-mixed keeps float32 master weights: it needs model.dtype = float32, not {cfg.model.dtype}"


def _check_products(cfg: Config) -> str | None:
    if cfg.model.precision != "bf16-mixed" or cfg.model.products != "numpy":
        return None
    return "numpy has no bfloat16 matrix product: bf16-mixed needs model.products = torch or auto"


def _check_restore_best(cfg: Config) -> str | None:
    if not cfg.checkpoint.restore_best or cfg.checkpoint.keep_best:
        return None
    return "true needs checkpoint.keep_best = true (the best model is read back from best.npz)"


# Keys that act only in some settings: (key, when it acts, the test). A value other than the default
# where the key does nothing is refused by name (no key is silently ignored).
_APPLIES: tuple[tuple[str, str, Callable[[Config], bool]], ...] = (
    ("train.momentum", "train.optimizer = momentum", lambda c: c.train.optimizer == "momentum"),
    ("train.nesterov", "train.optimizer = momentum", lambda c: c.train.optimizer == "momentum"),
    ("train.beta1", "train.optimizer = adam", lambda c: c.train.optimizer == "adam"),
    ("train.beta2", "train.optimizer = adam", lambda c: c.train.optimizer == "adam"),
    ("train.rho", "train.optimizer = rmsprop", lambda c: c.train.optimizer == "rmsprop"),
    ("train.eps", "train.optimizer = rmsprop or adam", lambda c: c.train.optimizer in ("rmsprop", "adam")),
    ("train.step_epochs", "train.schedule = step", lambda c: c.train.schedule == "step"),
    ("train.gamma", "train.schedule = step or plateau", lambda c: c.train.schedule in ("step", "plateau")),
    ("train.plateau_patience", "train.schedule = plateau", lambda c: c.train.schedule == "plateau"),
    ("train.plateau_cooldown", "train.schedule = plateau", lambda c: c.train.schedule == "plateau"),
    ("train.min_lr", "train.schedule = cosine or plateau", lambda c: c.train.schedule in ("cosine", "plateau")),
    ("train.max_skipped_steps", "train.on_nonfinite = skip", lambda c: c.train.on_nonfinite == "skip"),
    ("train.min_delta", "train.early_stopping_patience > 0, checkpoint.keep_best or train.schedule = plateau (it "
     "decides what improved)",
     lambda c: c.train.early_stopping_patience > 0 or c.checkpoint.keep_best or c.train.schedule == "plateau"),
    ("data.val_fraction", "data.val is empty (the validation set is then split off data.train)",
     lambda c: c.data.val == ""),
    ("model.dropout", "model.hidden is not empty or model.layers has more than 2 sizes (it drops hidden units)",
     lambda c: bool(c.model.hidden)),
    ("model.batch_norm", "model.hidden is not empty or model.layers has more than 2 sizes (it normalises hidden "
     "layers)", lambda c: bool(c.model.hidden)),
)


def _applies_check(key: str, when: str, acts: Callable[[Config], bool]) -> Callable[[Config], str | None]:
    section, name = key.split(".")

    def check(cfg: Config) -> str | None:
        value = getattr(getattr(cfg, section), name)
        if acts(cfg) or value == getattr(_SECTIONS[section](), name):
            return None
        return (f"{value!r} would change nothing: it applies only when {when}; "
                "remove it, or change the config so it applies")

    return check


_CROSS_CHECKS: tuple[tuple[str, str, Callable[[Config], str | None]], ...] = (
    (
        "model.loss",
        (
            "`cross_entropy` needs `output = softmax`; `binary_cross_entropy` needs "
            "`output = sigmoid`; `mse` works with any output"
        ),
        _check_loss_output,
    ),
    (
        "model.layers",
        "with `output = softmax` the last size must be >= 2",
        _check_softmax_width,
    ),
    (
        "data.normalize_targets",
        "`standard` needs `model.loss = mse` with `model.output = identity`",
        _check_target_scaling,
    ),
    ("model.dropout", "a list needs one rate per hidden layer", _check_dropout_rates),
    ("model.precision", "`bf16-mixed` needs `model.dtype = float32`", _check_precision),
    ("model.products", "`numpy` cannot do `model.precision = bf16-mixed`", _check_products),
    ("train.min_lr", "must be < `train.lr`", _check_min_lr),
    ("train.schedule", "`plateau` needs validation data (`data.val`, or `data.val_fraction` > 0)",
     _check_plateau_validation),
    ("train.gamma", "< 1 with `train.schedule = plateau`", _check_plateau_factor),
    ("train.plateau_patience", "with early stopping on, `train.early_stopping_patience` must exceed "
     "`train.plateau_patience + 1` (else the run stops before any reduction)", _check_plateau_patience),
    ("train.heartbeat_timeout", "0 (off) or at least 1", _check_heartbeat_timeout),
    (
        "checkpoint.restore_best",
        "`true` needs `checkpoint.keep_best = true`",
        _check_restore_best,
    ),
    *((key, f"a value other than the default needs {when} (elsewhere it would change nothing)",
       _applies_check(key, when, acts))
      for key, when, acts in _APPLIES),
)


# --- type coercion and per-field rules ---


def _show(value: Any) -> str:
    """``repr`` of a user value with its Python type, shortened for messages."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _coerce(key: str, typ: Any, meta: Mapping[str, Any], value: Any) -> Any:
    """Return ``value`` converted to the field type ``typ``, or raise ConfigError.

    Ints widen to float; bools are never numbers; integral floats are not ints.
    """
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(
            key, f"expected a boolean (true or false), got {_show(value)}"
        )
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
        raise ConfigError(key, f"expected an integer, got {_show(value)}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                out = float(value)
            except OverflowError:
                out = math.inf
            if not math.isfinite(out):
                raise ConfigError(key, f"expected a finite number, got {_show(value)}")
            return out
        raise ConfigError(key, f"expected a number, got {_show(value)}")
    if typ is str:
        if isinstance(value, str):
            return value
        if (
            meta.get("int_as_str")
            and isinstance(value, int)
            and not isinstance(value, bool)
        ):
            return str(value)
        if meta.get("bool_as_str") and isinstance(value, bool):
            return "true" if value else "false"
        want = "a string or an integer" if meta.get("int_as_str") else "a string"
        raise ConfigError(key, f"expected {want}, got {_show(value)}")
    if typing.get_args(typ) == (float, list[float]):  # a number, or a list of them
        if isinstance(value, (list, tuple)):
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                return [_coerce(key, float, meta, v) for v in value]
            raise ConfigError(key, f"expected a number or a list of numbers, got {_show(value)}")
        try:
            return _coerce(key, float, meta, value)
        except ConfigError:
            raise ConfigError(key, f"expected a number or a list of numbers, got {_show(value)}") from None
    if typing.get_origin(typ) is list and typing.get_args(typ) == (int,):
        if isinstance(value, (list, tuple)) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            return [int(v) for v in value]
        raise ConfigError(key, f"expected a list of integers, got {_show(value)}")
    raise TypeError(
        f"config field {key} has unsupported type {typ!r}"
    )  # a bug, not user error


def _check_rules(key: str, meta: Mapping[str, Any], value: Any) -> None:
    """Raise ConfigError if ``value`` (already coerced) breaks the field's rules."""
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(
            key, f"must be one of {', '.join(map(repr, choices))}; got {value!r}"
        )
    if meta.get("nonempty") and value == "":
        raise ConfigError(key, "must not be empty")
    if isinstance(value, list) and meta.get("each"):
        for i, v in enumerate(value):
            try:
                _check_rules(key, {k: v for k, v in meta.items() if k != "each"}, v)
            except ConfigError as exc:
                raise ConfigError(key, f"{exc.args[0].split(': ', 1)[-1]} (entry {i} of {value!r})") from None
        return
    if isinstance(value, list):
        n = meta.get("min_len")
        if n is not None and len(value) < n and not (meta.get("empty_ok") and not value):
            raise ConfigError(key, f"needs at least {n} entries, got {value!r}")
        lo = meta.get("item_min")
        if lo is not None:
            for i, v in enumerate(value):
                if v < lo:
                    raise ConfigError(
                        key, f"every entry must be >= {lo}, got {v} at index {i}"
                    )
        return
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        ok = (
            ("min" not in meta or value >= meta["min"])
            and ("max" not in meta or value <= meta["max"])
            and ("min_exclusive" not in meta or value > meta["min_exclusive"])
            and ("max_exclusive" not in meta or value < meta["max_exclusive"])
        )
        if not ok:
            raise ConfigError(key, f"must be {_bounds_text(meta)}, got {value!r}")


def _bounds_text(meta: Mapping[str, Any]) -> str:
    """Human text for a field's numeric bounds, e.g. ``>= 0 and < 1``; '' if none."""
    parts = []
    for name, op in (
        ("min", ">="),
        ("min_exclusive", ">"),
        ("max", "<="),
        ("max_exclusive", "<"),
    ):
        if name in meta:
            parts.append(f"{op} {meta[name]!r}")
    return " and ".join(parts)


def _allowed_text(meta: Mapping[str, Any]) -> str:
    """Human text for everything a field allows, shared by docs and TOML comments."""
    if "choices" in meta:
        return ", ".join(meta["choices"])
    parts = []
    if "min_len" in meta:
        parts.append(f"length >= {meta['min_len']}" + (" or empty" if meta.get("empty_ok") else ""))
    if "item_min" in meta:
        parts.append(f"each >= {meta['item_min']}")
    if _bounds_text(meta):
        parts.append(("number or list, each " if meta.get("each") else "") + _bounds_text(meta))
    if meta.get("nonempty"):
        parts.append("non-empty")
    return ", ".join(parts)


# --- unknown keys ---


# Names people bring from other trainers; checked before fuzzy matching.
_ALIASES = {
    "learning_rate": "train.lr",
    "batch": "train.batch_size",
    "num_epochs": "train.epochs",
    "max_epochs": "train.epochs",
    "patience": "train.early_stopping_patience",
    "hidden_layers": "model.hidden",
    "hidden_sizes": "model.hidden",
    "sizes": "model.layers",
    "val_split": "data.val_fraction",
    "out_dir": "run.dir",
    "output_dir": "run.dir",
}


def _guess(dotted: str) -> str | None:
    """The valid key (or section) the user most likely meant by ``dotted``."""
    section, _, name = dotted.partition(".")
    leaf = name or section
    if leaf in _ALIASES:
        return _ALIASES[leaf]
    # The right key in the wrong or no section, e.g. model.lr or lr -> train.lr.
    owners = [f"{s}.{leaf}" for s in _SECTIONS if leaf in _fields(s)]
    if section in _SECTIONS:
        close = difflib.get_close_matches(name, list(_fields(section)), n=1)
        if close:
            return f"{section}.{close[0]}"
    elif not owners:
        close = difflib.get_close_matches(section, list(_SECTIONS), n=1)
        if close and name:
            key = difflib.get_close_matches(name, list(_fields(close[0])), n=1)
            return f"{close[0]}.{key[0]}" if key else close[0]
        if close:
            return close[0]
    return owners[0] if owners else None


# Keys that earlier dpbp versions had, and why they went. A config that sets one is refused with
# the reason; a config saved by such a version (in a checkpoint or run directory) drops them.
RETIRED = {
    "train.shard_optimizer": "the sharded optimizer was removed: it gained nothing on one node or across "
                             "(simulated) nodes; the hierarchical exchange (train.node_shared) shares the update "
                             "instead (scripts/bench/README.md)",
    "train.overlap_allreduce": "the bucketed overlapped Allreduce was removed: it gained nothing on one node or "
                               "across (simulated) nodes (scripts/bench/README.md)",
    "train.bucket_mb": "it sized the buckets of train.overlap_allreduce, which was removed (scripts/bench/README.md)",
}


def _unknown(dotted: str) -> ConfigError:
    """ConfigError for an unknown section or key, with the closest valid key if any."""
    if dotted in RETIRED:
        return ConfigError(dotted, f"no longer exists: {RETIRED[dotted]}; remove it from the config")
    section, _, name = dotted.partition(".")
    if section in _SECTIONS and not name:
        example = f"{section}.{next(iter(_fields(section)))}"
        return ConfigError(
            dotted, f"'{section}' is a section; give section.key, e.g. {example}=..."
        )
    if section in _SECTIONS:
        what = f"unknown key '{dotted}'"
        where = f"keys in [{section}] are " + ", ".join(_fields(section))
    else:
        what = f"unknown section '{section}'" + (f" in '{dotted}'" if name else "")
        where = "sections are " + ", ".join(_SECTIONS)
    guess = _guess(dotted)
    return ConfigError(
        dotted, f"{what}; " + (f"did you mean '{guess}'?" if guess else where)
    )


def _split_key(dotted: str) -> tuple[str, str]:
    """``'train.lr'`` -> ``('train', 'lr')``; ConfigError if not a known field."""
    section, _, name = dotted.partition(".")
    if section not in _SECTIONS or name not in _fields(section):
        raise _unknown(dotted)
    return section, name


# --- building and validation ---


def _build(raw: Mapping[str, Any]) -> Config:
    """Config from a nested mapping; missing keys take defaults. Raises ConfigError."""
    if not isinstance(raw, Mapping):
        raise ConfigError("", f"expected a table of sections, got {_show(raw)}")
    retired = [f"{s}.{k}" for s, t in raw.items() if isinstance(t, Mapping) for k in t if f"{s}.{k}" in RETIRED]
    if len(retired) > 1:  # name them all at once: a config written by an earlier dpbp holds all of them
        raise ConfigError(retired[0], f"{', '.join(retired)} no longer exist ("
                          + "; ".join(f"{k}: {RETIRED[k]}" for k in retired) + "); remove them from the config")
    for name in raw:
        if name not in _SECTIONS:
            raise _unknown(str(name))
    sections = {}
    for sname, cls in _SECTIONS.items():
        table = raw.get(sname, {})
        if not isinstance(table, Mapping):
            raise ConfigError(sname, f"expected a table [{sname}], got {_show(table)}")
        fields = _fields(sname)
        for name in table:
            if name not in fields:
                raise _unknown(f"{sname}.{name}")
        defaults = cls()
        kwargs = {}
        for name, (typ, meta) in fields.items():
            key = f"{sname}.{name}"
            if name in table:
                value = _coerce(key, typ, meta, table[name])
            else:
                value = getattr(defaults, name)
            _check_rules(key, meta, value)
            kwargs[name] = value
        sections[sname] = cls(**kwargs)
    sections["model"] = _layers_or_hidden(sections["model"], raw.get("model", {}))
    cfg = Config(**sections)
    for key, _doc, check in _CROSS_CHECKS:
        message = check(cfg)
        if message:
            raise ConfigError(key, message)
    return cfg


def _layers_or_hidden(model: ModelConfig, given: Mapping[str, Any]) -> ModelConfig:
    """``model.layers`` set: ``model.hidden`` becomes its middle; both given and disagreeing: ConfigError."""
    if not model.layers:
        return model
    inner = list(model.layers[1:-1])
    if "hidden" in given and list(model.hidden) != inner:
        raise ConfigError("model.hidden", f"{list(model.hidden)} disagrees with model.layers = {list(model.layers)}; "
                          f"give one of them: model.hidden = {inner} (the input and output widths follow the data) "
                          "or model.layers alone (delete the hidden line of a file made by `dpbp config show`)")
    return dataclasses.replace(model, hidden=inner)


def default_config() -> Config:
    """All defaults (valid by construction, which the tests check)."""
    return Config()


def validate(cfg: Config) -> Config:
    """Check every field and cross-field rule; return a normalised copy.

    The copy has canonical types (ints widened to float where the field is float,
    ``label_column`` as str, lists as ``list``). ``cfg`` is not modified.
    Raises ConfigError naming the first offending dotted key.
    """
    return _build(to_dict(cfg))


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """Nested plain dict ``{section: {key: value}}``; lists are copies."""
    return dataclasses.asdict(cfg)


def from_dict(d: Mapping[str, Any]) -> Config:
    """Validated Config from a nested dict (e.g. a checkpoint's saved config).

    Missing sections/keys take defaults; ``RETIRED`` keys (saved by an earlier dpbp) are
    dropped; other unknown ones raise ConfigError.
    """
    if isinstance(d, Mapping):
        d = {section: ({k: v for k, v in table.items() if f"{section}.{k}" not in RETIRED}
                       if isinstance(table, Mapping) else table) for section, table in d.items()}
    return _build(d)


def replace(cfg: Config, **dotted: Any) -> Config:
    """Validated copy of ``cfg`` with dotted keys set.

    Example: ``replace(cfg, **{"train.epochs": 3})``.

    Values must already have the field's Python type (same rules as a TOML file).
    """
    d = to_dict(cfg)
    if "model.layers" in dotted and "model.hidden" not in dotted:
        d["model"].pop("hidden")  # the new layers set the hidden sizes
    elif "model.hidden" in dotted and "model.layers" not in dotted:
        d["model"]["layers"] = []  # the new hidden sizes go between the data's widths
    for key, value in dotted.items():
        section, name = _split_key(key)
        d[section][name] = value
    return _build(d)


def field_help(key: str) -> str:
    """One-line help of dotted ``key`` plus its allowed values, for CLI ``help=``."""
    section, name = _split_key(key)
    meta = _fields(section)[name][1]
    allowed = _allowed_text(meta)
    return f"{meta['help']} [{allowed}]" if allowed else meta["help"]


# --- TOML in ---


def _parse_override(item: str) -> tuple[str, str, Any]:
    """``'train.lr=0.1'`` -> ``('train', 'lr', 0.1)``.

    The value is read as a TOML value; text that is not valid TOML is taken as a
    bare string. For string fields any unquoted text is taken verbatim, so
    ``run.dir=2024`` means the directory "2024", not the integer 2024.
    """
    if "=" not in item:
        raise ConfigError("", f"override {item!r} is not key=value (e.g. train.lr=0.1)")
    key, text = item.split("=", 1)
    section, name = _split_key(key.strip())
    text = text.strip()
    try:
        parsed = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        value: Any = text
    else:
        # More than one key means the text smuggled in a newline and another key.
        value = parsed["v"] if set(parsed) == {"v"} else text
    if _fields(section)[name][0] is str and not isinstance(value, str):
        value = text
    return section, name, value


def load_config(
    path: str | None = None, overrides: Sequence[str] = (), base: Config | None = None
) -> Config:
    """Defaults (or ``base``), then the TOML file at ``path`` (if any), then ``key=value`` overrides.

    Later overrides win; ``base`` (e.g. a checkpoint's saved config) replaces the
    defaults, and the file's keys replace base keys one by one. Returns a validated
    Config; every problem (missing or unreadable file, TOML syntax, unknown key,
    wrong type, bad value) raises ConfigError.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError("", f"{path}: no such config file") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError("", f"{path}: invalid TOML: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError("", f"{path}: not UTF-8 text: {e}") from None
        except OSError as e:
            raise ConfigError("", f"{path}: cannot read: {e.strerror or e}") from None
    if base is not None:
        merged: dict[str, Any] = to_dict(base)
        # The file's model.layers or model.hidden replaces both of the base's.
        shape = raw.get("model") if isinstance(raw.get("model"), dict) else {}
        if "layers" in shape or "hidden" in shape:
            merged["model"].pop("hidden")
            merged["model"].pop("layers")
        for section, table in raw.items():
            if isinstance(table, dict) and isinstance(merged.get(section), dict):
                merged[section].update(table)
            else:
                merged[section] = table
        raw = merged
    if isinstance(overrides, str):  # a lone string would be iterated per character
        overrides = [overrides]
    given: set[tuple[str, str]] = set()
    for item in overrides:
        section, name, value = _parse_override(item)
        table = raw.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(
                section, f"expected a table [{section}], got {_show(table)}"
            )
        other = {"layers": "hidden", "hidden": "layers"}.get(name) if section == "model" else None
        if other is not None and ("model", other) not in given:
            table.pop(other, None)  # overrides the file's (or base's) model shape; both given here must agree
        table[name] = value
        given.add((section, name))
    return _build(raw)


# --- TOML out ---

_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _toml_value(value: Any) -> str:
    """One config value as a TOML literal (str, int, float, bool, or list of those)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # shortest round-tripping form; always has '.' or 'e'
    if isinstance(value, str):
        out = []
        for ch in value:
            if ch in _ESCAPES:
                out.append(_ESCAPES[ch])
            elif ord(ch) < 0x20 or ord(ch) == 0x7F:  # TOML forbids raw control chars
                out.append(f"\\u{ord(ch):04x}")
            else:
                out.append(ch)
        return '"' + "".join(out) + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as a TOML config value")


def to_toml(cfg: Config) -> str:
    """The config as TOML text that :func:`load_config` reads back to an equal Config.

    Sections in file order; every key preceded by a ``# help [allowed]`` comment line.
    """
    d = to_dict(cfg)
    lines = [
        "# dpbp run configuration; every key is optional and shown here with its value."
    ]
    for section in _SECTIONS:
        lines += ["", f"[{section}]"]
        for name, (_typ, meta) in _fields(section).items():
            allowed = _allowed_text(meta)
            lines.append(f"# {meta['help']}" + (f" [{allowed}]" if allowed else ""))
            lines.append(f"{name} = {_toml_value(d[section][name])}")
    return "\n".join(lines) + "\n"


# --- hash and docs ---


def config_hash(cfg: Config) -> str:
    """sha256 hex digest of the validated config as canonical JSON (sorted keys).

    Equal configs give equal hashes on every machine and Python version.
    """
    canon = json.dumps(
        to_dict(validate(cfg)),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
        allow_nan=False,
    )
    return hashlib.sha256(canon.encode("ascii")).hexdigest()


def _type_name(typ: Any) -> str:
    if typing.get_args(typ) == (float, list[float]):
        return "float or list[float]"
    if typing.get_origin(typ) is list:
        return "list[" + ", ".join(t.__name__ for t in typing.get_args(typ)) + "]"
    return typ.__name__


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def doc_markdown() -> str:
    """A Markdown config reference generated from the field metadata.

    One table per section (key, type, default, allowed, help) and the cross-field rules.
    """
    defaults = to_dict(default_config())
    lines = [
        "# Configuration reference",
        "",
        (
            "Generated from `dpbp/config.py`. Every key is optional. Set keys in a "
            "TOML file or override them as `section.key=value`."
        ),
    ]
    for section, cls in _SECTIONS.items():
        lines += [
            "",
            f"## [{section}]",
            "",
            (cls.__doc__ or "").strip(),
            "",
            "| key | type | default | allowed | help |",
            "|---|---|---|---|---|",
        ]
        for name, (typ, meta) in _fields(section).items():
            allowed = _allowed_text(meta) or "any"
            if meta.get("int_as_str"):
                allowed += " (an integer is accepted)"
            if meta.get("bool_as_str"):
                allowed += " (a TOML boolean is accepted)"
            row = (
                f"`{name}`",
                _type_name(typ),
                f"`{_toml_value(defaults[section][name])}`",
                allowed,
                meta["help"],
            )
            lines.append("| " + " | ".join(_md_cell(c) for c in row) + " |")
        rules = [(k, doc) for k, doc, _ in _CROSS_CHECKS if k.startswith(section + ".")]
        if rules:
            lines += [""] + [f"- `{k}`: {doc}" for k, doc in rules]
    return "\n".join(lines) + "\n"
