"""scikit-learn estimators over dpbp's trainer: ``MLPClassifier`` and ``MLPRegressor``.

``fit(X, y)`` turns the constructor parameters into one dpbp config, prepares ``X`` and ``y``
exactly as ``dpbp train`` prepares a file (``dpbp.train.prepare_data``: validation split, float64
normalisation, label mapping, target scaling) and runs the same ``Trainer``: the same step,
gradient exchange, early stopping and, with ``run_dir``, the same run directory, checkpoints,
``metrics.jsonl``, ``model.npz`` and TensorBoard events. Needs scikit-learn (``pip install
'dpbp[sklearn]'``).

**Data-parallel from a script.** Started by an MPI launcher (``mpirun -n 4 python script.py``),
``fit`` trains data-parallel over all ranks: **every rank passes the full** ``X`` **and** ``y``
(as every rank of ``dpbp train`` reads the whole file); each rank trains on its own shard of every
global batch. The ranks' data and parameters are compared (sha256 of the prepared arrays, a hash
of the config) before training: a rank with other data raises on every rank instead of training
a different model. The result equals one process's (float64: to about 1e-10) and the fitted
estimator is complete on every rank; ``predict`` and ``score`` are local (no collective).
Printing (``verbose``), warnings and files (``run_dir``) come from rank 0 alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import re
import warnings
from pathlib import Path

import numpy as np

from dpbp.errors import DpbpError, InputError, MissingExtraError

try:
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
    from sklearn.utils.multiclass import check_classification_targets
    from sklearn.utils.validation import check_is_fitted, column_or_1d, validate_data
except ImportError as _exc:  # pragma: no cover - exercised by a test that hides scikit-learn
    raise MissingExtraError(f"dpbp.MLPClassifier and dpbp.MLPRegressor need scikit-learn ({_exc}): "
                            "pip install 'dpbp[sklearn]'") from None

from dpbp import config as config_mod
from dpbp import data as data_mod
from dpbp.comm import MPIComm, SerialComm, differing_ranks, get_comm
from dpbp.model import MLP
from dpbp.optim import OPTIMIZERS
from dpbp.targets import Targets
from dpbp.train import PreparedData, Trainer, TrainingError, prepare_data, target_normalizer

__all__ = ["MLPClassifier", "MLPRegressor"]

ACTIVATIONS = {"relu": "relu", "tanh": "tanh", "logistic": "sigmoid", "sigmoid": "sigmoid",
               "leaky_relu": "leaky_relu", "identity": "identity"}  # scikit-learn's 'logistic' is dpbp's sigmoid
SOLVERS = OPTIMIZERS  # dpbp's optimizers are the solvers
AUTO_BATCH = 200  # batch_size="auto": scikit-learn's min(200, n_samples); a batch never exceeds the data

# Config keys the constructor parameters set (and ``config`` may not), and keys that make no sense here.
OWNED = {
    "model.hidden": "hidden_layer_sizes", "model.layers": "hidden_layer_sizes", "model.activation": "activation",
    "model.output": "the estimator", "model.loss": "the estimator", "model.dtype": "dtype",
    "data.normalize": "normalize", "data.val_fraction": "early_stopping and validation_fraction",
    "train.epochs": "max_iter", "train.batch_size": "batch_size", "train.lr": "learning_rate_init",
    "train.optimizer": "solver", "train.momentum": "momentum", "train.nesterov": "nesterovs_momentum",
    "train.beta1": "beta_1", "train.beta2": "beta_2", "train.eps": "epsilon", "train.weight_decay": "weight_decay",
    "train.seed": "random_state", "train.shuffle": "shuffle", "train.early_stopping_patience": "n_iter_no_change",
    "train.min_delta": "tol", "checkpoint.restore_best": "early_stopping", "run.dir": "run_dir",
    "data.train": "fit(X, y)", "data.val": "fit(X, y)", "data.test": "fit(X, y)", "data.label_column": "fit(X, y)",
    "data.header": "fit(X, y)",
}
NEED_RUN_DIR = ("checkpoint.", "run.tensorboard")  # keys that only act on files

_COMMS: dict[str, object] = {}  # one communicator per process and kind: MPI's node windows are freed after each fit


def _communicator(kind: str):
    """``auto``: MPI when an MPI launcher started the process, else one process; ``serial``; ``mpi``."""
    if kind not in ("auto", "serial", "mpi"):
        raise InputError(f"comm must be 'auto', 'serial' or 'mpi', got {kind!r}")
    if kind == "serial":
        return SerialComm()
    if kind not in _COMMS:
        try:
            _COMMS[kind] = MPIComm() if kind == "mpi" else get_comm()  # get_comm: also DPBP_COMM=serial|mpi
        except ImportError as exc:
            raise MissingExtraError(f"comm='mpi' needs mpi4py ({exc}): pip install 'dpbp[mpi]'") from None
    return _COMMS[kind]


def _agreed(comm, fn, what: str):
    """Run ``fn`` on every rank; when it raises on any rank, raise on every rank (no rank left in a collective).

    The failing rank re-raises its own exception; the others raise the same kind (InputError
    for a ValueError, TypeError, else DpbpError) naming that rank and its message.
    """
    try:
        result, failure = fn(), None
    except Exception as exc:  # noqa: BLE001 - agreed on below, then re-raised
        result, failure = None, exc
    if comm.size == 1:
        if failure is not None:
            raise failure
        return result
    kind = lambda e: "value" if isinstance(e, ValueError) else "type" if isinstance(e, TypeError) else "other"  # noqa: E731
    seen = comm.allgather_obj(None if failure is None else (kind(failure), str(failure)))
    bad = [(rank, f) for rank, f in enumerate(seen) if f is not None]
    if failure is not None:
        raise failure
    if bad:
        rank, (k, message) = bad[0]
        text = f"rank {rank}, {what}: {message}"
        raise InputError(text) if k == "value" else TypeError(text) if k == "type" else DpbpError(text)
    return result


@contextlib.contextmanager
def _as_input_errors():
    """dpbp's errors about bad input (config, data: exit code 2) become InputError, a ValueError."""
    try:
        yield
    except InputError:
        raise
    except DpbpError as exc:
        if exc.exit_code == 2 and not isinstance(exc, TrainingError):
            raise InputError(_in_parameters(str(exc))) from None
        raise


def _in_parameters(message: str) -> str:
    """``message`` with each config key an estimator parameter sets replaced by that parameter's name
    (``change train.batch_size`` -> ``change batch_size``): the user of an estimator cannot set the key."""
    for key in sorted(OWNED, key=len, reverse=True):
        if OWNED[key].isidentifier():
            message = re.sub(rf"(?<![\w.]){re.escape(key)}(?![\w])", OWNED[key], message)
    return message


def _json_label(value):
    """A class label as the targets record holds it (str, int or float), or None when it has no such form."""
    value = value.item() if isinstance(value, np.generic) else value
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str) or (isinstance(value, numbers.Integral)):
        return value if isinstance(value, str) else int(value)
    if isinstance(value, numbers.Real) and math.isfinite(value):
        return float(value)
    return None


class _DpbpMLP(BaseEstimator):
    """The parameters and the machinery both estimators share (see MLPClassifier for the parameters)."""

    _output = _loss = ""  # set by the subclasses

    def __init__(self, hidden_layer_sizes=(100,), activation="relu", *, solver="adam", learning_rate_init=0.001,
                 batch_size="auto", max_iter=200, shuffle=True, random_state=None, tol=1e-4,
                 n_iter_no_change=10, early_stopping=False, validation_fraction=0.1, momentum=0.9,
                 nesterovs_momentum=True, beta_1=0.9, beta_2=0.999, epsilon=1e-8, weight_decay=0.0,
                 normalize="standard", dtype=None, run_dir=None, verbose=False, config=None, comm="auto"):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.learning_rate_init = learning_rate_init
        self.batch_size = batch_size
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.n_iter_no_change = n_iter_no_change
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.weight_decay = weight_decay
        self.normalize = normalize
        self.dtype = dtype
        self.run_dir = run_dir
        self.verbose = verbose
        self.config = config
        self.comm = comm

    # ------------------------------------------------------------------ parameters -> config

    def _config(self, dtype: np.dtype, *, incremental: bool = False) -> config_mod.Config:
        """The dpbp config these parameters describe. Raises InputError naming the parameter."""
        given = self.hidden_layer_sizes
        sizes = [given] if isinstance(given, numbers.Integral) else \
            list(given) if isinstance(given, (tuple, list, np.ndarray)) else None
        if sizes is None or not all(isinstance(h, numbers.Integral) and not isinstance(h, bool) and h >= 1
                                    for h in sizes):
            raise InputError(f"hidden_layer_sizes must be a tuple of positive integers, got {given!r}")
        hidden = [int(h) for h in sizes]
        if self.activation not in ACTIVATIONS:
            raise InputError(f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}, got {self.activation!r}")
        if self.solver not in SOLVERS:
            hint = " (lbfgs is not a mini-batch method: dpbp trains by backpropagation on mini-batches)" \
                if self.solver == "lbfgs" else ""
            raise InputError(f"solver must be one of {', '.join(map(repr, SOLVERS))}, got {self.solver!r}{hint}")
        batch = AUTO_BATCH if isinstance(self.batch_size, str) and self.batch_size == "auto" else self.batch_size
        seed = 0 if self.random_state is None else self.random_state
        if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
            raise InputError(f"random_state must be None or an integer (every rank must draw the same numbers), "
                             f"got {self.random_state!r}")
        patience = 0 if self.n_iter_no_change is None else self.n_iter_no_change
        stop_early = bool(self.early_stopping) and not incremental
        if stop_early and not self.validation_fraction:
            raise InputError("early_stopping=True needs validation_fraction > 0 (it stops on the validation score)")
        epochs = self.max_iter
        if incremental:  # one more epoch of one run: the shuffle and the history go on
            epochs = len(self.history_) + 1 if hasattr(self, "model_") else 1
        dotted = {
            "model.hidden": hidden, "model.activation": ACTIVATIONS[self.activation], "model.output": self._output,
            "model.loss": self._loss, "model.dtype": dtype.name, "data.train": "the data passed to fit",
            "data.normalize": self.normalize,
            "data.val_fraction": self.validation_fraction if stop_early else 0.0,
            "train.epochs": epochs, "train.batch_size": batch, "train.lr": self.learning_rate_init,
            "train.optimizer": self.solver, "train.momentum": self.momentum, "train.nesterov": self.nesterovs_momentum,
            "train.beta1": self.beta_1, "train.beta2": self.beta_2, "train.eps": self.epsilon,
            "train.weight_decay": self.weight_decay, "train.seed": seed, "train.shuffle": self.shuffle,
            "train.early_stopping_patience": 0 if incremental else patience, "train.min_delta": self.tol,
            "checkpoint.restore_best": stop_early, "run.dir": "" if self.run_dir is None else str(self.run_dir),
        }
        extra = dict(self.config or {})
        for key in extra:
            if key in OWNED:
                raise InputError(f"config[{key!r}]: set by {OWNED[key]}, not by config")
            if self.run_dir is None and key.startswith(NEED_RUN_DIR):
                raise InputError(f"config[{key!r}] acts on the run directory's files: give run_dir as well")
        if extra.get("train.schedule") == "plateau" and not stop_early and not incremental:
            raise InputError("config['train.schedule'] = 'plateau' lowers the rate when the validation loss stops "
                             "improving: it needs early_stopping=True, which holds out validation_fraction of the "
                             "data (and n_iter_no_change > config['train.plateau_patience'] + 1)")
        if incremental and extra.get("train.schedule", "constant") != "constant":
            raise InputError("partial_fit trains one epoch per call at a constant learning rate; "
                             "config['train.schedule'] applies to fit")
        numeric = {"train.epochs": "max_iter", "train.batch_size": "batch_size", "train.seed": "random_state",
                   "train.early_stopping_patience": "n_iter_no_change"}
        for key, name in numeric.items():  # scikit-learn passes NumPy integers; the config takes Python ints
            value = dotted[key]
            if isinstance(value, numbers.Integral) and not isinstance(value, bool):
                dotted[key] = int(value)
            elif key != "train.seed":
                raise InputError(f"{name} must be an integer, got {value!r}")
        for key in ("train.lr", "train.momentum", "train.beta1", "train.beta2", "train.eps", "train.weight_decay",
                    "train.min_delta", "data.val_fraction"):
            value = dotted[key]
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                dotted[key] = float(value)
        for key, solvers in (("train.momentum", ("momentum",)), ("train.nesterov", ("momentum",)),
                             ("train.beta1", ("adam",)), ("train.beta2", ("adam",)),
                             ("train.eps", ("adam", "rmsprop"))):
            if self.solver not in solvers:  # as in scikit-learn, a solver's parameters mean nothing to the others
                dotted.pop(key)
        try:
            return config_mod.replace(config_mod.default_config(), **dotted, **extra)
        except config_mod.ConfigError as exc:
            raise InputError(self._name_parameter(exc)) from None

    @staticmethod
    def _name_parameter(exc: config_mod.ConfigError) -> str:
        """A config message with the estimator's parameter named instead of the config key it maps to."""
        name = OWNED.get(exc.key)
        return f"{name} ({exc})" if name else _in_parameters(str(exc))

    # ------------------------------------------------------------------ fitting

    def _check_X(self, X, *, reset: bool):
        """X as a 2-D float32/float64 array (float32 stays float32), checked by scikit-learn's rules."""
        return validate_data(self, X, reset=reset, dtype=[np.float64, np.float32])

    def _model_dtype(self, X: np.ndarray) -> np.dtype:
        if self.dtype is None:
            return X.dtype  # as scikit-learn: float32 data trains in float32, everything else in float64
        if str(self.dtype) not in ("float32", "float64"):
            raise InputError(f"dtype must be None, 'float32' or 'float64', got {self.dtype!r}")
        return np.dtype(str(self.dtype))

    def _fit(self, X, y, *, incremental: bool, classes=None):
        comm = _communicator(self.comm)
        first = not (incremental and hasattr(self, "model_"))

        def check():
            if y is None:
                raise InputError(f"{type(self).__name__} requires y to be passed, but the target y is None")
            X_, y_ = self._check_Xy(X, y, reset=first)
            y_ids = self._encode_y(y_, first=first, classes=classes, incremental=incremental)
            dtype = self._model_dtype(X_) if first else self.model_.dtype
            return X_, y_ids, dtype, self._config(dtype, incremental=incremental)

        X, y_ids, dtype, cfg = _agreed(comm, check, "checking the parameters, X and y")
        differ = differing_ranks(comm, config_mod.config_hash(cfg))
        if differ:  # DP: every rank must train the same model
            raise InputError(f"rank(s) {differ} passed other estimator parameters than rank 0; every rank must "
                             "construct the same estimator")
        echo = print if self.verbose and comm.is_root else (lambda text: None)
        raw = data_mod.Dataset(X, y_ids, "the data passed to fit")
        with _as_input_errors():
            if not incremental:  # then also first
                data = _agreed(comm, lambda: prepare_data(cfg, raw), "preparing the data")
            else:
                data = _agreed(comm, lambda: self._prepare_increment(cfg, raw, first), "preparing the data")
            if self._classes_record is not None:
                data.targets = dataclasses.replace(data.targets, classes=self._classes_record)
            run_root = None if incremental or self.run_dir is None else Path(self.run_dir)
            trainer = Trainer(cfg, comm, run_root, echo=echo, data=data)
            try:
                result = self._train(trainer, cfg, first=first, incremental=incremental)
            finally:
                comm.free_node_shared()  # DP: the window of this fit; the fitted model holds copies
        self._record(trainer, result, data, incremental=incremental, first=first)
        if comm.is_root:
            for note in data.notes:
                warnings.warn(note.removeprefix("warning: "), UserWarning, stacklevel=3)
        return self

    def _train(self, trainer: Trainer, cfg, *, first: bool, incremental: bool):
        """Run ``trainer`` (claiming a new run-NNN under ``run_dir`` first); returns (TrainResult, state arrays)."""
        if incremental and not first:
            trainer.load_state(self._state)  # DP: the same arrays on every rank
            trainer.state.epoch = cfg.train.epochs - 1  # this call's epoch: its own shuffle
            trainer.state.global_step = self._steps
        if trainer.run_dir is not None:
            trainer.claim_run_dir(numbered=True)  # also opens the TensorBoard log of run.tensorboard
        result = trainer.run()
        return result, trainer.state_arrays()

    def _prepare_increment(self, cfg, raw: data_mod.Dataset, first: bool) -> PreparedData:
        """PreparedData for partial_fit: the input map and the targets are fitted on the first call only."""
        dtype = np.dtype(cfg.model.dtype)
        if first:
            normalizer = data_mod.Normalizer.fit(cfg.data.normalize, raw.x)
            targets = self._increment_targets(cfg, raw)
        else:
            normalizer, targets = self.normalizer_, self.targets_
        y = targets.encode(raw.y, dtype=dtype) if targets.task != "classification" else raw.y
        ds = data_mod.Dataset(normalizer.apply(raw.x, dtype), y, raw.source)
        sizes = [raw.n_features, *cfg.model.hidden, targets.outputs]
        data_mod.validate(ds, n_in=sizes[0], n_out=sizes[-1], role="train")
        return PreparedData(ds, None, None, normalizer, targets, sizes)

    def _record(self, trainer: Trainer, outcome, data: PreparedData, *, incremental: bool, first: bool) -> None:
        """Set the fitted attributes from a finished trainer (identical on every rank)."""
        result, state = outcome
        # a private copy: the trainer's parameters may live in node-shared memory
        model = self.model_ = MLP.from_arrays(trainer.model.describe(), state)
        self.normalizer_ = data.normalizer
        self.targets_ = data.targets
        self.n_outputs_ = model.sizes[-1]
        history = [dict(r) for r in result.history]
        if incremental and not first:
            history = self.history_ + history
        self.history_ = history
        self.loss_curve_ = [r["train_loss"] for r in history]
        key = "val_accuracy" if self._loss == "cross_entropy" else "val_r2"
        self.validation_scores_ = [r[key] for r in history] if history and history[0].get(key) is not None else None
        self.n_iter_ = len(history)
        self.stopped_ = result.stopped
        self.run_dir_ = trainer.run_dir if trainer.run_dir is not None and not incremental else None
        self._state = state
        self._steps = result.state.global_step

    # ------------------------------------------------------------------ using the fitted model

    def _outputs(self, X) -> np.ndarray:
        """The network's outputs for raw ``X`` ``(n, n_features_in_)``: normalised in float64 as in training."""
        check_is_fitted(self, "model_")
        X = self._check_X(X, reset=False)
        return self.model_.predict(self.normalizer_.apply(X, self.model_.dtype))

    def _network(self):
        """``(model, inputs, targets)`` as ``dpbp.checkpoint.load_network`` gives them (for ONNX export and save)."""
        from dpbp.checkpoint import Network

        check_is_fitted(self, "model_")
        return Network(self.model_, self.normalizer_, self.targets_)

    def save(self, path) -> None:
        """Write the fitted model as a ``model.npz`` that ``dpbp evaluate``, ``predict`` and ``export`` read.

        Rank 0 writes (call it on every rank, or on rank 0 alone: it is no collective). Raises SaveError.
        """
        from dpbp.checkpoint import save_model

        model, inputs, targets = self._network()
        if _communicator(self.comm).is_root:
            save_model(path, model, inputs, targets)

    _classes_record: list | None = None  # the class labels as the run directory's targets record holds them


class MLPClassifier(ClassifierMixin, _DpbpMLP):
    """A multilayer perceptron classifier trained by dpbp (softmax output, cross-entropy loss).

    Parameters follow scikit-learn's ``MLPClassifier`` where they mean the same thing:

    * ``hidden_layer_sizes`` (tuple of int, default (100,)), ``activation`` ('relu', 'tanh',
      'logistic' or 'sigmoid', 'leaky_relu', 'identity');
    * ``solver``: 'adam' (default), 'sgd' (plain), 'momentum' (``momentum``,
      ``nesterovs_momentum``) or 'rmsprop'; ``learning_rate_init`` (0.001); ``beta_1``,
      ``beta_2``, ``epsilon`` (Adam; epsilon also RMSprop);
    * ``batch_size``: the GLOBAL batch over all ranks; 'auto' is min(200, n_samples);
    * ``max_iter``: epochs; ``shuffle``; ``random_state``: int or None (None is 0: every rank
      must draw the same initial weights and shuffles);
    * ``tol``, ``n_iter_no_change``: stop when the loss (the validation loss with
      ``early_stopping``) has not improved by ``tol`` for that many epochs (None: never);
    * ``early_stopping``: hold out ``validation_fraction`` of the training rows and, at the end,
      keep the parameters of the epoch with the best validation loss.

    dpbp's own:

    * ``weight_decay`` (0.0): decoupled (AdamW) for adam, an L2 term otherwise (scikit-learn's
      ``alpha`` is an L2 penalty on the loss, hence another name);
    * ``normalize``: 'standard' (default), 'minmax' or 'none': the input map fitted on the
      training rows in float64, applied to X in fit and predict (and folded into exports);
    * ``dtype``: None (float32 X trains in float32, anything else in float64), 'float32', 'float64';
    * ``run_dir``: None (no files), or a folder in which each ``fit`` makes a new run directory
      ``run-NNN`` (``run_dir_``) as ``dpbp train`` does: run.json, config.toml, metrics.jsonl,
      checkpoints, model.npz (``partial_fit`` writes none);
    * ``verbose``: rank 0 prints dpbp's progress lines and epoch summaries;
    * ``config``: a dict of further dpbp config keys, e.g. ``{"train.schedule": "cosine",
      "run.tensorboard": True}`` (keys a parameter sets are refused, checkpoint and run keys
      need ``run_dir``);
    * ``comm``: 'auto' (MPI when an MPI launcher started the process), 'serial' (this process
      alone, even under mpirun), 'mpi'.

    Fitted attributes: ``classes_``, ``n_features_in_``, ``feature_names_in_`` (for a DataFrame
    with string column names), ``loss_curve_`` (training loss per epoch), ``validation_scores_``
    (validation accuracy per epoch with ``early_stopping``, else None), ``history_`` (each epoch's
    record, as metrics.jsonl), ``n_iter_``, ``stopped_`` ('epochs' or 'early_stopping'),
    ``run_dir_``, ``model_`` (the ``dpbp.MLP``, taking normalised inputs), ``normalizer_``,
    ``targets_``. Errors about the parameters or the data raise ``dpbp.errors.InputError``, a
    ``ValueError``.
    """

    _output, _loss = "softmax", "cross_entropy"

    def fit(self, X, y):
        """Train on ``X`` ``(n_samples, n_features)`` and class labels ``y`` ``(n_samples,)`` of any sortable kind.

        Starts from new weights. Returns self. Under MPI: collective, every rank passes the same X and y.
        """
        return self._fit(X, y, incremental=False)

    def partial_fit(self, X, y, classes=None):
        """One epoch over ``X``, ``y``, continuing from the current weights and optimizer state.

        ``classes`` (every label the model will see) is required on the first call. The input map
        is fitted on the first call's X and kept. No run directory, no early stopping.
        """
        return self._fit(X, y, incremental=True, classes=classes)

    def _check_Xy(self, X, y, *, reset: bool):
        X, y = validate_data(self, X, y, reset=reset, dtype=[np.float64, np.float32])
        y = column_or_1d(y, warn=True)
        check_classification_targets(y)
        return X, y

    def _encode_y(self, y, *, first: bool, classes, incremental: bool):
        if not first and incremental and classes is not None:
            try:
                same = np.array_equal(np.unique(np.asarray(classes)), self.classes_)
            except TypeError:
                same = False
            if not same:  # as scikit-learn: the classes are fixed by the first call
                raise InputError(f"classes={list(np.asarray(classes))!r} is not the same as classes_="
                                 f"{list(self.classes_)!r} of the first call to partial_fit")
        if first:
            labels = np.asarray(classes) if incremental else y
            if incremental and classes is None:
                raise InputError("classes must be passed on the first call to partial_fit")
            try:
                self.classes_ = np.unique(labels)
            except TypeError as exc:
                raise InputError(f"the class labels cannot be sorted ({exc}); use labels of one kind") from None
            if len(self.classes_) < 2:
                raise InputError(f"a classifier needs samples of at least 2 classes, but the data contain only one "
                                 f"class: {self.classes_[0]!r}")
            record = [_json_label(c) for c in self.classes_]
            self._classes_record = None if None in record else record
        ids = np.searchsorted(self.classes_, y)
        ids = np.minimum(ids, len(self.classes_) - 1)
        unseen = self.classes_[ids] != y
        if np.any(unseen):
            raise InputError(f"y holds labels not in classes_: {sorted(set(np.asarray(y)[unseen].tolist()))[:5]!r}")
        return ids.astype(np.int64)

    def _increment_targets(self, cfg, raw) -> Targets:
        return Targets("classification", len(self.classes_), list(range(len(self.classes_))))

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities ``(n_samples, n_classes)`` in the order of ``classes_`` (the model dtype)."""
        return self._outputs(X)

    def predict_log_proba(self, X) -> np.ndarray:
        """``log(predict_proba(X))``."""
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))

    def predict(self, X) -> np.ndarray:
        """The most probable class label of each row, ``(n_samples,)``, of the labels' own kind."""
        out = self._outputs(X)  # first: NotFittedError before fit
        return self.classes_[np.argmax(out, axis=1)]


class MLPRegressor(RegressorMixin, _DpbpMLP):
    """A multilayer perceptron regressor trained by dpbp (identity output, ``mse`` loss).

    The parameters and fitted attributes are those of :class:`MLPClassifier` (no ``classes_``;
    ``validation_scores_`` holds R^2). The targets are standardised for training (mean 0, std 1
    per column of the training rows, in float64; ``config={"data.normalize_targets": "none"}``
    turns it off) and every prediction is in their own units. ``y`` may have several columns.
    """

    _output, _loss = "identity", "mse"

    def fit(self, X, y):
        """Train on ``X`` ``(n_samples, n_features)`` and targets ``y`` ``(n_samples,)`` or ``(n_samples, n_targets)``.

        Starts from new weights. Returns self. Under MPI: collective, every rank passes the same X and y.
        """
        return self._fit(X, y, incremental=False)

    def partial_fit(self, X, y):
        """One epoch over ``X``, ``y``, continuing from the current weights and optimizer state.

        The input map and the target scaling are fitted on the first call and kept.
        No run directory, no early stopping.
        """
        return self._fit(X, y, incremental=True)

    def _check_Xy(self, X, y, *, reset: bool):
        X, y = validate_data(self, X, y, reset=reset, dtype=[np.float64, np.float32], y_numeric=True,
                             multi_output=True)
        if not reset and (y.ndim == 1 and self.n_outputs_ != 1 or y.ndim == 2 and y.shape[1] != self.n_outputs_):
            raise InputError(f"y has {1 if y.ndim == 1 else y.shape[1]} target columns; the model has "
                             f"{self.n_outputs_}")
        return X, y

    def _encode_y(self, y, *, first: bool, classes, incremental: bool):
        return np.asarray(y, dtype=np.float64)

    def _increment_targets(self, cfg, raw) -> Targets:
        return Targets.fit("regression", raw.y, normalize=target_normalizer(cfg))

    def predict(self, X) -> np.ndarray:
        """Predicted targets in their own units: ``(n_samples,)`` for one target column, else ``(n_samples, k)``."""
        out = self._outputs(X)  # first: NotFittedError before fit
        out = self.targets_.output_values(out)
        return out.ravel() if out.shape[1] == 1 else out

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags
