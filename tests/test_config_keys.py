"""No config key is ever silently ignored: every key changes what a run does, or its value is refused.

``PROBES`` names, for every key of the config, a value other than the default, the setting it
matters in, and what must change: the trained parameters, the history, the printed lines, the
files of the run directory, or a call the key configures. A key without a probe fails the test,
so a new key must come with the behaviour that proves it does something.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import small_config

from dpbp import config as config_mod
from dpbp import exchange, train
from dpbp.comm import SerialComm
from dpbp.errors import DpbpError
from dpbp.train import Trainer

TIMING = ("seconds", "samples_per_s")  # differ from run to run: never compared
RUN = ("train.epochs=3", "data.val_fraction=0.2")  # every probe's run: helpers.small_config plus these


class Spy(SerialComm):
    """A single process that records how it was asked to watch itself."""

    def __init__(self):
        self.watchdog = []

    def configure_watchdog(self, heartbeat_timeout, collective_timeout):
        self.watchdog.append((heartbeat_timeout, collective_timeout))


def tables(folder: Path) -> dict[str, str]:
    """A classification and a regression table with a header row (for the data.* keys)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, 2))
    names = np.array(["cat", "dog", "owl"])[(x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5)]
    classes, values = folder / "classes.csv", folder / "values.csv"
    classes.write_text("a,b,kind\n" + "".join(f"{u:.4f},{v:.4f},{k}\n" for (u, v), k in zip(x, names)))
    values.write_text("a,b,y\n" + "".join(f"{u:.4f},{v:.4f},{100 + 30 * u - 7 * v:.3f}\n" for u, v in x))
    return {"classes": str(classes), "values": str(values)}


def observe(overrides: list[str], folder: Path, monkeypatch) -> dict:
    """What a short run with ``overrides`` does: everything a key could change, timing left out."""
    comm, syncs, threads, lines = Spy(), [], [], []
    monkeypatch.setattr(train, "check_in_sync", lambda c, p, when: syncs.append(when))
    monkeypatch.setattr(train, "configure_blas_threads", lambda n, local, products="numpy": threads.append(n) or 1)
    run_dir = folder / f"run{len(list(folder.iterdir()))}"
    try:
        given_val = any(o.startswith("data.val=") for o in overrides)  # then val_fraction has no say (refused)
        cfg = small_config(*(r for r in RUN if not (given_val and r.startswith("data.val_fraction"))), *overrides)
        trainer = Trainer(cfg, comm, run_dir if cfg.run.dir == "unused" else Path(cfg.run.dir),
                          echo=lines.append)
        trainer.exchange.nodes = 2  # as if ranks held copies that could drift: the sync checks run
        result = trainer.run()
    except DpbpError as exc:
        return {"refused": str(exc)}
    history = [{k: v for k, v in r.items() if k not in TIMING} for r in result.history]
    files = sorted(str(p.relative_to(trainer.run_dir)) for p in trainer.run_dir.rglob("*")
                   if p.is_file() and p.name not in ("run.json", "run.lock"))
    model = trainer.run_dir / "model.npz"
    return {
        "params": hashlib.sha256(result.model.params.tobytes()).hexdigest() + str(result.model.sizes),
        "history": json.dumps(history, sort_keys=True, default=str),
        "lines": len(lines),
        "files": files,
        "model": hashlib.sha256(model.read_bytes()).hexdigest() if model.exists() else None,
        "final": json.dumps({k: v for k, v in result.final.items() if k not in TIMING}, sort_keys=True),
        "syncs": len(syncs),
        "watchdog": comm.watchdog,
        "threads": threads,
        "where": str(trainer.run_dir.name),
    }


# key: (value, the setting it is probed in (overrides), what must change)
PROBES = {
    "model.layers": ("[2,5,3]", (), "params"),
    "model.hidden": ("[4]", ("model.layers=[]",), "params"),
    "model.activation": ("tanh", (), "params"),
    "model.output": ("sigmoid", ("model.loss=mse", "model.layers=[]"), "params"),
    "model.loss": ("mse", (), "params"),
    "model.init": ("normal", (), "params"),
    "model.dtype": ("float32", (), "params"),
    "model.dropout": (0.5, (), "params"),
    "model.batch_norm": ("true", (), "params"),
    "model.precision": ("bf16-mixed", ("model.dtype=float32",), "params"),
    "model.products": ("numpy", ("model.dtype=float32", "model.precision=bf16-mixed"), "refused"),
    "data.train": ("spirals:n=200", (), "params"),
    "data.val": ("spirals:n=50,noise=0.5", (), "history"),
    "data.val_fraction": (0.3, (), "params"),
    "data.test": ("spirals:n=40", (), "final"),
    "data.normalize": ("minmax", (), "params"),
    "data.normalize_targets": ("none", ("data.train={values}", "model.layers=[]", "model.loss=mse",
                                        "model.output=identity"), "history"),
    "data.label_column": ("first", ("data.train={values}", "model.layers=[]", "model.hidden=[4]"), "params"),
    "data.header": ("false", ("data.train={classes}", "model.layers=[]"), "refused"),
    "train.epochs": (2, (), "params"),
    "train.batch_size": (16, (), "params"),
    "train.lr": (0.02, (), "params"),
    "train.optimizer": ("sgd", (), "params"),
    "train.momentum": (0.5, ("train.optimizer=momentum",), "params"),
    "train.nesterov": ("true", ("train.optimizer=momentum",), "params"),
    "train.beta1": (0.5, (), "params"),
    "train.beta2": (0.9, (), "params"),
    "train.rho": (0.5, ("train.optimizer=rmsprop",), "params"),
    "train.eps": (0.1, (), "params"),
    "train.weight_decay": (0.1, (), "params"),
    "train.schedule": ("cosine", (), "params"),
    "train.warmup_epochs": (1.0, (), "params"),
    "train.step_epochs": (1, ("train.schedule=step",), "params"),
    "train.gamma": (0.5, ("train.schedule=step", "train.step_epochs=1"), "params"),
    "train.min_lr": (0.01, ("train.schedule=cosine",), "params"),
    "train.plateau_patience": (0, ("train.schedule=plateau", "train.min_delta=1.0"), "params"),
    "train.plateau_cooldown": (1, ("train.schedule=plateau", "train.min_delta=1.0", "train.plateau_patience=0",
                                   "train.epochs=4"),
                               "params"),
    "train.clip_grad_norm": (0.01, (), "params"),
    "train.seed": (1, (), "params"),
    "train.shuffle": ("false", (), "params"),
    "train.early_stopping_patience": (1, ("train.min_delta=10.0",), "history"),
    "train.min_delta": (10.0, ("train.early_stopping_patience=1",), "history"),
    "train.check_sync_every": (1, (), "syncs"),  # with copies that could drift (see observe)
    "train.heartbeat_timeout": (5.0, (), "watchdog"),
    "train.collective_timeout": (5.0, (), "watchdog"),
    "train.node_shared": ("off", (), "exchange"),  # only ranks can share memory: probed on 2 of them below
    "train.on_nonfinite": ("skip", ("train.lr=1e200", "train.optimizer=sgd"), "refused"),
    "train.max_skipped_steps": (1, ("train.lr=1e200", "train.optimizer=sgd", "train.on_nonfinite=skip"), "refused"),
    "train.threads": (1, (), "threads"),
    "train.log_every": (1, (), "lines"),
    "checkpoint.every_steps": (5, (), "files"),
    "checkpoint.every_epochs": (0, (), "files"),
    "checkpoint.keep": (1, (), "files"),
    "checkpoint.keep_best": ("false", (), "files"),
    "checkpoint.restore_best": ("true", ("data.val=spirals:n=50,noise=0.5",), "model"),
    "run.dir": ("{folder}/elsewhere", (), "where"),
    "run.tensorboard": ("true", (), "files"),
}


def all_keys() -> list[str]:
    return [f"{section}.{f.name}" for section, cls in config_mod._SECTIONS.items() for f in dataclasses.fields(cls)]


def test_every_key_has_a_probe():
    assert sorted(PROBES) == sorted(all_keys())


@pytest.mark.parametrize("key", sorted(PROBES))
def test_every_key_changes_behaviour_or_is_refused(key, tmp_path, monkeypatch):
    value, setting, what = PROBES[key]
    names = {**tables(tmp_path), "folder": str(tmp_path)}
    setting = [s.format(**names) for s in setting]
    value = str(value).format(**names)
    run = [r for r in RUN if not (any(x.startswith("data.val=") for x in setting) and r.startswith("data.val_f"))]
    before = config_mod.to_dict(small_config(*run, *setting))  # the run the probe changes
    section, name = key.split(".")
    assert str(before[section][name]).lower() != value.lower(), f"{key}: probe with a value other than the run's"
    runs = tmp_path / "runs"
    runs.mkdir()
    if what == "exchange":  # one process has nothing to exchange: the choice on two ranks of one node
        class TwoRanks:
            size, local_size = 2, 2

            def allgather_obj(self, obj):
                return [obj, obj]

        modes = {m: exchange.use_shared_memory(small_config(f"{key}={m}").train.node_shared, TwoRanks())
                 for m in ("auto", value)}
        assert modes["auto"] != modes[value]
        return
    base = observe(setting, runs, monkeypatch)
    changed = observe([*setting, f"{key}={value}"], runs, monkeypatch)
    if what == "refused":  # the run ends with a message, and another one than without the key
        assert "refused" in changed and changed != base, (base, changed)
    else:
        assert "refused" not in base and "refused" not in changed, (base, changed)
        assert base[what] != changed[what], f"{key}={value} changed nothing in {what}: {base[what]!r}"


@pytest.mark.parametrize("key", sorted(config_mod.RETIRED))
def test_retired_keys_are_refused_by_name_and_dropped_from_saved_configs(key):
    """Keys whose feature was measured and removed: a config that sets one is told why; an old checkpoint resumes."""
    section, name = key.split(".")
    with pytest.raises(DpbpError, match=rf"config {key}: no longer exists: .*remove it from the config"):
        config_mod.load_config(None, [f"{key}=true"])
    saved = config_mod.to_dict(config_mod.default_config())
    saved[section][name] = True  # as an earlier dpbp saved it in a checkpoint's meta or config.toml
    assert config_mod.from_dict(saved) == config_mod.default_config()
