"""A run's state at a step boundary: what a checkpoint holds, writing it, reading it back, and the checks.

``TrainState`` is the global progress (no per-rank iterators: the shuffle is a pure function of
``(seed, epoch)`` and the learning rate of the global step and, for the plateau schedule, its state,
saved beside as ``meta["schedule"]["plateau"]``). ``save`` (rank 0 writes, every rank
agrees), ``restore`` (every rank reads, after ``check_compatible`` has refused a checkpoint of
another model, optimizer, config or data from its metadata alone) and ``restore_best`` act on a
``dpbp.train.Trainer``; the file format itself is ``dpbp.checkpoint``'s, the lineage ``dpbp.rundir``'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dpbp import checkpoint as ckpt
from dpbp import config as config_mod
from dpbp import rundir as rundir_mod
from dpbp.comm import all_or_nothing, check_in_sync
from dpbp.config import Config
from dpbp.errors import CheckpointError
from dpbp.optim import Plateau
from dpbp.targets import Targets

# Changing these between a checkpoint and its resume would change the data order or the model.
# How the products are computed does not change the model, its state or the data order: a run may
# continue in another precision or library (the step's rounding changes from there on).
RESUMABLE = ("model.precision", "model.products")
FROZEN_ON_RESUME = ("model.", "data.train", "data.val", "data.val_fraction", "data.normalize",
                    "data.label_column", "data.header", "train.batch_size", "train.seed", "train.shuffle",
                    "train.optimizer")


@dataclass
class TrainState:
    """Everything global needed to continue a run exactly (no per-rank iterators).

    The shuffle is a pure function of (seed, epoch) and the learning rate of the
    global step (plus the plateau schedule's ``dpbp.optim.Plateau``, which the checkpoint
    holds beside this), so this plus parameters and optimizer state is the whole run.
    """

    epoch: int = 0  # 0-based epoch in progress
    step_in_epoch: int = 0  # next step inside that epoch
    global_step: int = 0  # updates applied so far
    best_val_loss: float = math.inf
    epochs_since_best: int = 0
    epoch_loss_sum: float = 0.0  # running train sums of the epoch in progress
    epoch_correct: float = 0.0
    epoch_count: float = 0.0
    stopped: str = ""  # "early_stopping" once early stopping fired
    grad_norm_sums: list = field(default_factory=list)  # per-layer ||dL/dW|| summed over sampled steps
    grad_norm_count: int = 0
    skipped_steps: int = 0  # updates left out by train.on_nonfinite = "skip", over the whole run (resumes too)
    epoch_clipped_steps: int = 0  # train.clip_grad_norm: steps of the epoch in progress that were clipped
    epoch_clip_factor_min: float = 1.0  # ... and the smallest factor applied in it

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["best_val_loss"] = None if math.isinf(self.best_val_loss) else self.best_val_loss
        return d

    @classmethod
    def from_json(cls, d: dict) -> TrainState:
        d = dict(d)
        d["best_val_loss"] = math.inf if d.get("best_val_loss") is None else d["best_val_loss"]
        return cls(**d)


def _flatten(d: dict) -> dict:
    return {f"{section}.{key}": value for section, table in d.items() for key, value in table.items()}


def frozen_changes(saved: dict, cfg: Config) -> list[str]:
    """The keys of ``FROZEN_ON_RESUME`` whose value in ``cfg`` differs from the ``saved`` config (a dict).

    A key the saved config lacks (written by a dpbp that did not have it yet, e.g. model.dropout)
    counts as its default, which is what that dpbp did.
    """
    before = {**_flatten(config_mod.to_dict(Config())), **_flatten(saved)}
    return [k for k, v in _flatten(config_mod.to_dict(cfg)).items()
            if k.startswith(FROZEN_ON_RESUME) and k not in RESUMABLE and before.get(k) != v]


def payload(trainer) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, metadata) describing ``trainer``'s run at this step boundary: global state only.

    The parameters live in the normalised input space, so the normaliser goes with them
    (``norm_shift``/``norm_scale`` in float64, meta ``normalize``), and so does what the
    outputs mean (meta ``targets``, arrays ``target_shift``/``target_scale`` for scaled
    regression targets): any checkpoint can then be evaluated or used as a model.
    """
    t = trainer
    arrays = {"params": t.model.params, **t.model.running_arrays()}
    for name, value in t.optimizer.state_dict().items():
        arrays[f"optim_{name}"] = value
    norm = t.data.normalizer
    arrays.update(norm.to_arrays())  # float64, as training applied it
    arrays.update(t.data.targets.to_arrays())
    meta = {
        "config": config_mod.to_dict(t.cfg),
        "model": t.model.describe(),
        "optimizer": {"name": t.optimizer.name, "t": t.optimizer.t},
        "schedule": {"kind": t.cfg.train.schedule, "lr_next": t.schedule(t.state.global_step),
                     **({"plateau": t.plateau.to_json()} if t.plateau is not None else {})},
        "state": t.state.to_json(),
        "rng": {"shuffle": "numpy default_rng([train.seed, epoch])", "seed": t.cfg.train.seed},
        "history": t.history,
        "world_size": t.comm.size,  # informational: resuming on another rank count is fine
        "data_digest": t.data_digest,
        "validation_digest": (t.digests["validation"] or {}).get("sha256"),
        "normalize": norm.kind,
        "targets": t.data.targets.to_meta(),
    }
    return arrays, meta


def save(trainer, best: bool = False) -> Path | None:
    """Rank 0 writes a checkpoint of ``trainer`` (collective: call on every rank). Returns its path, which exists.

    It records its lineage (run id, save number ``seq``, parent); periodic checkpoints beyond
    ``checkpoint.keep`` are pruned by ``seq`` within the lineage. A periodic save at the step of
    the newest save (for example right after resuming) writes nothing and returns that file.
    Parameters that are not finite are never written (TrainingError, exit 3).
    """
    t = trainer
    t.require_finite_params("before writing a checkpoint")
    folder = t.checkpoint_dir
    if folder is None:
        if best:  # checkpoint.restore_best without a run directory (the estimators): the best stays in memory
            t.best_copy = ({"params": t.model.params.copy(), **t.model.running_arrays()},
                           {"epoch": t.state.epoch, "step": t.state.global_step, "val_loss": t.state.best_val_loss})
        return None
    st = t.state
    if best:
        path = folder / ckpt.BEST_NAME
    else:
        path = folder / ckpt.checkpoint_name(st.global_step)
        if t.last_saved is not None and t.last_saved[0] == st.global_step:
            return t.last_saved[1]
    arrays, meta = payload(t) if t.comm.is_root else (None, None)

    def write():
        if t.comm.is_root:
            seq = t.rundir.reserve_seq()
            meta["run"] = {"run_id": t.rundir.run_id, "seq": seq, "parent": t.parent}
            ckpt.save_checkpoint(path, arrays, meta)
            t.rundir.added(seq, path, st.global_step, best)
            if not best:
                t.rundir.prune(t.cfg.checkpoint.keep)
            return {"run_id": t.rundir.run_id, "seq": seq}
        return None

    entry = all_or_nothing(t.comm, write, f"writing checkpoint {path}")  # DP: a full disk ends every rank
    if t.comm.is_root:
        t.parent = entry
        t.model_lineage = {**entry, "step": st.global_step}
    if not best:
        t.last_saved = (st.global_step, path)
    return path


def restore(trainer, path: str | Path) -> None:
    """``trainer`` continues from checkpoint ``path`` (collective). Refuses one of another model or data.

    Reads only: the run directory is written when it is claimed (``Trainer.claim_run_dir``), which
    also decides whether this starts a branch of the run's lineage.
    """
    t, path = trainer, Path(path)

    def load():
        # The model, optimizer and data are checked from the metadata, before any array is read.
        arrays, meta = ckpt.load_checkpoint(path, check=lambda meta: check_compatible(t, path, meta))
        try:
            state = TrainState.from_json(meta["state"])
            saved = meta.get("schedule", {}).get("plateau")  # absent: not a plateau run; the schedule starts fresh
            plateau = Plateau.from_json(saved) if saved is not None else Plateau()
            history = [dict(r) for r in meta["history"]]
            if not (0 <= state.epoch and 0 <= state.step_in_epoch < t.steps_per_epoch and 0 <= state.global_step):
                raise ValueError(f"position epoch {state.epoch}, step {state.step_in_epoch} is out of range")
            run = meta.get("run")
            if run is not None and not (isinstance(run.get("run_id"), str) and isinstance(run.get("seq"), int)):
                raise ValueError("malformed lineage entry")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            # Only a hand-made file gets here: the checksum matched, the content does not make sense.
            raise CheckpointError(f"{path}: malformed checkpoint metadata ({type(exc).__name__}: {exc})") from None
        return arrays, state, history, run, plateau

    arrays, state, history, run, plateau = all_or_nothing(t.comm, load, f"reading checkpoint {path}")
    t.load_state(arrays)
    t.state = state
    if t.plateau is not None:
        t.schedule.plateau = plateau
    t.history = history
    t.resumed_from = rundir_mod.Resume(path, {**run, "step": state.global_step} if run else None)
    t.parent = {"run_id": run["run_id"], "seq": run["seq"]} if run else None
    t.model_lineage = {**(t.parent or {}), "step": state.global_step}
    t.last_saved = None
    check_in_sync(t.comm, t.model.params, "after loading the checkpoint")


def restore_best(trainer) -> None:
    """``checkpoint.restore_best``: put the best-validation parameters back before the final model is saved.

    Rank 0 reads ``best.npz`` of this run's lineage and every rank receives its parameters
    (collective); without a run directory, the copy kept in memory at the best epoch (the same on
    every rank). Without a best checkpoint (no validation data, no improvement) the last
    parameters stay and rank 0 says so.
    """
    t = trainer
    if t.checkpoint_dir is None:
        if t.best_copy is None:
            t.echo("warning: checkpoint.restore_best: no best model in this run; the final model is the last one")
            return
        arrays, info = t.best_copy
        t.exchange.write_params(t.model, arrays["params"])
        t.model.load_running(arrays)
        t.echo(f"restored the best model: epoch {info['epoch']}, val loss {info['val_loss']:.4f} "
               "(checkpoint.restore_best)")
        return

    def read():
        if not t.comm.is_root:
            return None
        best = [e for e in t.rundir.entries if e.best]
        if not best:
            return None
        arrays, meta = ckpt.load_checkpoint(best[0].path)
        st = meta["state"]  # saved at the end of the best epoch: ``epoch`` counts it as done
        kept = {k: arrays[k] for k in ("params", *t.model.running_arrays())}
        return kept, {**meta["run"], "epoch": st["epoch"], "val_loss": st["best_val_loss"], "step": st["global_step"]}

    found = all_or_nothing(t.comm, read, "reading the best checkpoint")
    info = t.comm.bcast_obj(found[1] if found is not None else None)
    if info is None:
        t.echo("warning: checkpoint.restore_best: no best checkpoint in this run; the final model is the last one")
        return
    arrays = found[0] if t.comm.is_root else {"params": np.empty_like(t.model.params), **t.model.running_arrays()}
    for name in sorted(arrays):
        t.comm.bcast_(arrays[name])  # DP: every rank continues with rank 0's best parameters (and statistics)
    t.exchange.write_params(t.model, arrays["params"])
    t.model.load_running(arrays)
    t.model_lineage = {**t.model_lineage, "restored_best": info["seq"], "step": info["step"],
                       "final_step": t.state.global_step}
    t.echo(f"restored the best model: epoch {info['epoch']}, val loss {info['val_loss']:.4f} "
           "(checkpoint.restore_best)")


def check_compatible(trainer, path, meta: dict) -> None:
    """Raise CheckpointError unless checkpoint metadata ``meta`` fits ``trainer``'s model, optimizer and data.

    Needs the metadata only; the arrays' shapes and dtypes follow from it and are
    checked by ``ckpt.load_checkpoint`` before they are read.
    """
    t = trainer
    mine, theirs = t.model.describe(), meta["model"]
    keys = ("sizes", "activation", "output", "loss", "dtype", "dropout", "batch_norm")
    before = {"dropout": [0.0] * (len(mine["sizes"]) - 2), "batch_norm": False}  # what files without the keys meant
    differ = [f"{k}: checkpoint {theirs.get(k, before.get(k))!r}, config {mine[k]!r}" for k in keys
              if theirs.get(k, before.get(k)) != mine[k]]
    if differ:
        raise CheckpointError(f"{path} holds a different model ({'; '.join(differ)}); resume with the "
                              "checkpoint's model settings, or start a new run directory")
    if meta["optimizer"].get("name") != t.optimizer.name:
        raise CheckpointError(f"{path} was trained with optimizer {meta['optimizer'].get('name')!r}; "
                              f"the config asks for {t.optimizer.name!r}")
    frozen = frozen_changes(meta["config"], t.cfg)
    if frozen:
        raise CheckpointError(f"{path}: cannot resume with changed {', '.join(frozen)} "
                              "(they define the model or the data order); start a new run directory instead")
    recorded = meta.get("targets")
    if recorded is not None and recorded != t.data.targets.to_meta():
        raise CheckpointError(f"{path}: its labels ({Targets.from_meta(recorded, None).describe()}) differ from "
                              f"the training data's ({t.data.targets.describe()})")
    if meta.get("data_digest") != t.data_digest:
        older = ("; it was written by an earlier dpbp, which prepared the data differently (float32 models: "
                 "normalised after the cast, not before), so resume it with that dpbp or start a new run"
                 if meta.get("format_version", 0) < 3 else "")
        raise CheckpointError(f"{path}: the training data differs from the data this checkpoint was trained on"
                              f"{older}")
    mine = (t.digests["validation"] or {}).get("sha256")
    if "validation_digest" in meta and meta["validation_digest"] != mine:  # early stopping and best.npz use it
        raise CheckpointError(f"{path}: the validation data differs from the data this run validated on")
