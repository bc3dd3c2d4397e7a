"""Tests for dpbp.config: loading, overrides, validation, TOML round trip, hash, docs."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpbp import config as C
from dpbp.errors import ConfigError

ALL_KEYS = [
    f"{s.name}.{f.name}"
    for s in dataclasses.fields(C.Config)
    for f in dataclasses.fields(s.default_factory())
]


def write(tmp_path: Path, text: str, name: str = "run.toml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def error(fn, *args, **kwargs) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    return info.value


# --- defaults and structure ---


def test_defaults_validate_and_match_spec():
    cfg = C.default_config()
    assert C.validate(cfg) == cfg
    assert C.load_config() == cfg
    assert cfg.model.layers == [] and cfg.model.hidden == [128, 128]  # widths from the data
    assert cfg.train.lr == 0.01 and cfg.train.batch_size == 64
    assert cfg.checkpoint.every_epochs == 1 and cfg.run.dir == ""  # "": a new numbered run directory
    assert [s.name for s in dataclasses.fields(C.Config)] == [
        "model",
        "data",
        "train",
        "checkpoint",
        "run",
    ]


def test_every_field_has_help_and_default():
    for section in dataclasses.fields(C.Config):
        for f in dataclasses.fields(section.default_factory()):
            help_text = f.metadata.get("help", "")
            assert help_text and "\n" not in help_text, f.name
            assert (
                f.default is not dataclasses.MISSING
                or f.default_factory is not dataclasses.MISSING
            )


def test_default_lists_are_not_shared():
    a, b = C.default_config(), C.default_config()
    a.model.hidden.append(9)
    assert b.model.hidden == [128, 128]


def test_config_is_frozen():
    cfg = C.default_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 0.5  # type: ignore[misc]


# --- loading files ---


def test_load_file_and_types(tmp_path):
    path = write(
        tmp_path,
        """
[model]
layers = [784, 128, 10]
dtype = "float64"
[data]
label_column = 0
val_fraction = 0
[train]
lr = 1
optimizer = "momentum"
nesterov = true
""",
    )
    cfg = C.load_config(path)
    assert cfg.model.layers == [784, 128, 10]
    assert cfg.model.dtype == "float64"
    assert cfg.data.label_column == "0"  # int accepted, stored as str
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert isinstance(cfg.data.val_fraction, float)
    assert cfg.train.nesterov is True
    assert cfg.train.epochs == 40  # untouched keys keep defaults


def test_missing_file(tmp_path):
    missing = str(tmp_path / "nope.toml")
    err = error(C.load_config, missing)
    assert err.key == "" and missing in str(err)


def test_toml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "[train]\nlr = 0.1\nepochs = \n", name="broken.toml")
    msg = str(error(C.load_config, path))
    assert "broken.toml" in msg and "line 3" in msg


def test_section_must_be_table(tmp_path):
    err = error(C.load_config, write(tmp_path, 'train = "fast"\n'))
    assert err.key == "train" and "table" in str(err)


@pytest.mark.parametrize(
    ("text", "key", "suggestion"),
    [
        ("[train]\nlearning_rate = 0.1\n", "train.learning_rate", "train.lr"),
        ("[train]\nbatchsize = 8\n", "train.batchsize", "train.batch_size"),
        ("[model]\nlr = 0.1\n", "model.lr", "train.lr"),
        ("[trian]\nlr = 0.1\n", "trian", "train"),
        ("[modle]\n", "modle", "model"),
        ("lr = 0.1\n", "lr", "train.lr"),
    ],
)
def test_unknown_key_in_file_suggests(tmp_path, text, key, suggestion):
    err = error(C.load_config, write(tmp_path, text))
    assert err.key == key
    assert "unknown" in str(err) and f"did you mean '{suggestion}'?" in str(err)


def test_unknown_key_without_close_match_lists_valid_keys():
    msg = str(error(C.load_config, None, ["checkpoint.zzzzzz=1"]))
    assert "every_steps, every_epochs, keep, keep_best" in msg


# --- overrides ---


@pytest.mark.parametrize(
    ("item", "key", "expected"),
    [
        ("train.lr=0.1", "train.lr", 0.1),
        ("train.lr=1", "train.lr", 1.0),
        ("train.epochs=7", "train.epochs", 7),
        ("train.shuffle=false", "train.shuffle", False),
        ("checkpoint.keep_best=false", "checkpoint.keep_best", False),
        ("model.layers=[784,128,10]", "model.layers", [784, 128, 10]),
        ("model.layers = [5, 3]", "model.layers", [5, 3]),
        ("data.train=spirals", "data.train", "spirals"),
        ("data.train=/tmp/a.npz", "data.train", "/tmp/a.npz"),
        ("data.train=x.npy,y.npy", "data.train", "x.npy,y.npy"),
        ('data.train="quoted name.csv"', "data.train", "quoted name.csv"),
        ("data.val=", "data.val", ""),
        ("data.label_column=2", "data.label_column", "2"),
        ("data.label_column=species", "data.label_column", "species"),
        ("run.dir=2024", "run.dir", "2024"),  # str field: digits stay text
        ("model.activation=tanh", "model.activation", "tanh"),
    ],
)
def test_override_types(item, key, expected):
    cfg = C.load_config(None, [item])
    section, name = key.split(".")
    value = getattr(getattr(cfg, section), name)
    assert value == expected and type(value) is type(expected)


def test_overrides_beat_file_and_later_wins(tmp_path):
    path = write(tmp_path, "[train]\nlr = 0.5\nepochs = 2\n")
    cfg = C.load_config(path, ["train.lr=0.2", "train.lr=0.3"])
    assert cfg.train.lr == 0.3 and cfg.train.epochs == 2


def test_override_value_cannot_smuggle_extra_keys():
    cfg = C.load_config(None, ["data.train=a\nx = 1"])
    assert cfg.data.train == "a\nx = 1"


def test_override_without_equals():
    err = error(C.load_config, None, ["train.lr"])
    assert "key=value" in str(err)


@pytest.mark.parametrize(
    ("item", "suggestion"),
    [
        ("train.lrr=0.1", "train.lr"),
        ("model.lr=0.1", "train.lr"),
        ("modle.layerz=[1,2]", "model.layers"),
        ("train.learning_rate=0.1", "train.lr"),
    ],
)
def test_unknown_override_suggests(item, suggestion):
    err = error(C.load_config, None, [item])
    assert err.key == item.split("=")[0]
    assert f"did you mean '{suggestion}'?" in str(err)


def test_section_alone_is_not_a_key():
    err = error(C.load_config, None, ["train=1"])
    assert "section" in str(err) and "train." in str(err)


# --- wrong types ---


@pytest.mark.parametrize(
    ("item", "key", "fragment"),
    [
        ("train.epochs=true", "train.epochs", "expected an integer, got True (bool)"),
        ("train.epochs=3.0", "train.epochs", "expected an integer, got 3.0 (float)"),
        ("train.epochs=abc", "train.epochs", "expected an integer, got 'abc' (str)"),
        ("train.lr=abc", "train.lr", "expected a number, got 'abc' (str)"),
        ('train.lr="0.1"', "train.lr", "expected a number, got '0.1' (str)"),
        ("train.lr=false", "train.lr", "expected a number, got False (bool)"),
        ("train.lr=nan", "train.lr", "finite"),
        ("train.lr=inf", "train.lr", "finite"),
        ("train.shuffle=1", "train.shuffle", "expected a boolean"),
        ("train.shuffle=yes", "train.shuffle", "expected a boolean"),
        ("model.layers=[2,true]", "model.layers", "expected a list of integers"),
        ("model.layers=[2.0,3]", "model.layers", "expected a list of integers"),
        ("model.layers=7", "model.layers", "expected a list of integers"),
    ],
)
def test_wrong_types(item, key, fragment):
    err = error(C.load_config, None, [item])
    assert err.key == key
    assert fragment in str(err)


def test_wrong_type_in_file_is_strict_for_strings(tmp_path):
    err = error(C.load_config, write(tmp_path, "[run]\ndir = 5\n"))
    assert err.key == "run.dir" and "expected a string" in str(err)
    err = error(C.load_config, write(tmp_path, "[data]\nlabel_column = true\n"))
    assert "a string or an integer" in str(err)


# --- bounds, choices, cross-field rules ---


@pytest.mark.parametrize(
    ("item", "key", "fragment"),
    [
        ("train.lr=0", "train.lr", "> 0"),
        ("train.lr=-0.1", "train.lr", "> 0"),
        ("train.batch_size=0", "train.batch_size", ">= 1"),
        ("train.epochs=0", "train.epochs", ">= 1"),
        ("data.val_fraction=1.0", "data.val_fraction", "< 1"),
        ("data.val_fraction=-0.1", "data.val_fraction", ">= 0"),
        ("train.momentum=1", "train.momentum", "< 1"),
        ("train.gamma=0", "train.gamma", "> 0"),
        ("train.gamma=1.5", "train.gamma", "<= 1"),
        ("train.eps=0", "train.eps", "> 0"),
        ("train.seed=-1", "train.seed", ">= 0"),
        ("checkpoint.keep=0", "checkpoint.keep", ">= 1"),
        ("model.layers=[4]", "model.layers", "at least 2"),
        ("model.layers=[4,0,3]", "model.layers", ">= 1"),
        ("data.train=", "data.train", "empty"),
    ],
)
def test_out_of_bounds(item, key, fragment):
    err = error(C.load_config, None, [item])
    assert err.key == key and fragment in str(err)


def test_bounds_edges_accepted():
    cfg = C.load_config(
        None,
        ["data.val_fraction=0", "train.schedule=step", "train.gamma=1", "train.optimizer=momentum",
         "train.momentum=0", "train.threads=0"],
    )
    assert cfg.train.gamma == 1.0 and cfg.data.val_fraction == 0.0


@pytest.mark.parametrize(
    ("item", "allowed"),
    [
        ("model.activation=gelu", "'leaky_relu'"),
        ("train.optimizer=lbfgs", "'rmsprop'"),
        ("data.normalize=zscore", "'minmax'"),
        ("train.on_nonfinite=ignore", "'skip'"),
    ],
)
def test_bad_choice_lists_allowed(item, allowed):
    err = error(C.load_config, None, [item])
    assert err.key == item.split("=")[0]
    assert "must be one of" in str(err) and allowed in str(err)


@pytest.mark.parametrize(
    "items",
    [
        ["model.output=sigmoid"],  # cross_entropy needs softmax
        ["model.output=identity"],
        ["model.loss=binary_cross_entropy"],  # needs sigmoid, default is softmax
        ["model.loss=binary_cross_entropy", "model.output=identity"],
    ],
)
def test_bad_loss_output_pairing(items):
    err = error(C.load_config, None, items)
    assert err.key == "model.loss" and "needs output" in str(err)


@pytest.mark.parametrize(
    "items",
    [
        ["model.loss=mse", "model.output=identity"],
        ["model.loss=mse", "model.output=softmax"],
        ["model.loss=binary_cross_entropy", "model.output=sigmoid"],
        [
            "model.loss=binary_cross_entropy",
            "model.output=sigmoid",
            "model.layers=[2,1]",
        ],
    ],
)
def test_good_loss_output_pairing(items):
    C.load_config(None, items)


def test_softmax_needs_two_outputs():
    err = error(C.load_config, None, ["model.layers=[2,8,1]"])
    assert err.key == "model.layers"


def test_min_lr_below_lr():
    err = error(C.load_config, None, ["train.schedule=cosine", "train.min_lr=0.01"])
    assert err.key == "train.min_lr" and "train.lr" in str(err)
    assert C.load_config(None, ["train.schedule=cosine", "train.min_lr=0.001"]).train.min_lr == 0.001


# --- validate, from_dict, replace ---


def test_validate_normalises_without_mutating():
    raw = C.Config(train=C.TrainConfig(lr=1))
    out = C.validate(raw)
    assert isinstance(out.train.lr, float) and raw.train.lr == 1
    bad = C.Config(train=C.TrainConfig(batch_size=0))
    assert error(C.validate, bad).key == "train.batch_size"


def test_from_dict_roundtrip_and_unknown_keys():
    cfg = C.load_config(None, ["train.lr=0.5", "model.layers=[3,4]"])
    assert C.from_dict(C.to_dict(cfg)) == cfg
    assert C.from_dict({"train": {"epochs": 2}}).train.epochs == 2
    assert error(C.from_dict, {"train": {"epoch": 2}}).key == "train.epoch"
    assert error(C.from_dict, {"optim": {}}).key == "optim"


def test_to_dict_is_plain_and_detached():
    cfg = C.default_config()
    d = C.to_dict(cfg)
    assert json.loads(json.dumps(d)) == d
    d["model"]["hidden"].append(1)
    assert cfg.model.hidden == [128, 128]


def test_replace():
    cfg = C.default_config()
    new = C.replace(cfg, **{"train.epochs": 3, "run.dir": "/tmp/x"})
    assert new.train.epochs == 3 and new.run.dir == "/tmp/x"
    assert cfg.train.epochs == 40  # original untouched
    assert error(C.replace, cfg, **{"train.epoch": 3}).key == "train.epoch"
    assert error(C.replace, cfg, **{"train.epochs": 0}).key == "train.epochs"
    assert error(C.replace, cfg, **{"train.epochs": "3"}).key == "train.epochs"


def test_field_help():
    assert "learning rate" in C.field_help("train.lr")
    assert "relu" in C.field_help("model.activation")
    assert error(C.field_help, "train.nope").key == "train.nope"


# --- TOML out ---

NON_DEFAULT = [
    "model.layers=[784, 256, 128, 10]",
    "model.activation=leaky_relu",
    "model.loss=binary_cross_entropy",
    "model.output=sigmoid",
    "model.dtype=float64",
    "train.shuffle=false",
    "checkpoint.keep_best=false",
    "train.lr=0.1",
    "train.eps=1e-12",
    "train.beta2=0.9999999999999999",
    "train.schedule=cosine",
    "train.min_lr=1.5e-300",
    "train.warmup_epochs=2.5",
    "train.seed=123456789012",
    "data.val_fraction=0",
    'data.train="C:\\\\data\\\\x \\"q\\".npz"',
    'data.label_column="col|with \\"quotes\\" and \\\\"',
    'run.dir="tab\\there\\nnewline \\u0001 del\\u007f é ünï"',
]


@pytest.mark.parametrize(
    "overrides", [[], NON_DEFAULT], ids=["defaults", "non_default"]
)
def test_to_toml_round_trip(tmp_path, overrides):
    cfg = C.load_config(None, overrides)
    text = C.to_toml(cfg)
    assert C.load_config(write(tmp_path, text)) == cfg
    assert C.to_toml(C.load_config(write(tmp_path, text))) == text


def test_round_trip_strings_exact(tmp_path):
    cfg = C.load_config(None, NON_DEFAULT)
    assert cfg.data.train == 'C:\\data\\x "q".npz'
    assert cfg.run.dir == "tab\there\nnewline \x01 del\x7f é ünï"
    back = C.load_config(write(tmp_path, C.to_toml(cfg)))
    assert back.data.train == cfg.data.train and back.run.dir == cfg.run.dir


def test_to_toml_layout():
    lines = C.to_toml(C.default_config()).splitlines()
    sections = [line for line in lines if line.startswith("[")]
    assert sections == ["[model]", "[data]", "[train]", "[checkpoint]", "[run]"]
    keys = []
    for i, line in enumerate(lines):
        if " = " in line and not line.startswith("#"):
            assert lines[i - 1].startswith("# "), line  # help comment right above
            keys.append(line.split(" = ")[0])
    assert len(keys) == len(ALL_KEYS)


# --- hash ---


def test_config_hash_stable_and_sensitive():
    cfg = C.default_config()
    h = C.config_hash(cfg)
    assert len(h) == 64 and h == C.config_hash(C.default_config())
    canon = json.dumps(C.to_dict(cfg), sort_keys=True, separators=(",", ":"))
    assert h == hashlib.sha256(canon.encode()).hexdigest()
    # Int vs float spelling of the same value hashes the same after validation.
    assert C.config_hash(C.Config(train=C.TrainConfig(lr=1))) == C.config_hash(
        C.Config(train=C.TrainConfig(lr=1.0))
    )
    changed = {
        C.config_hash(C.replace(cfg, **{key: value}))
        for key, value in [
            ("train.lr", 0.02),
            ("train.epochs", 41),
            ("model.layers", [2, 64, 3]),
            ("train.shuffle", False),
            ("run.dir", "other"),
        ]
    }
    assert h not in changed and len(changed) == 5


def test_config_hash_same_in_another_process():
    code = "from dpbp.config import config_hash, default_config as d; print(config_hash(d()))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    ).stdout.strip()
    assert out == C.config_hash(C.default_config())


# --- docs ---


def test_doc_markdown_mentions_every_field():
    doc = C.doc_markdown()
    for key in ALL_KEYS:
        section, name = key.split(".")
        assert f"| `{name}` |" in doc, key
    for section in ("model", "data", "train", "checkpoint", "run"):
        assert f"## [{section}]" in doc
    assert "leaky_relu" in doc and "> 0.0" in doc and "length >= 2" in doc
    # Every table row has exactly 5 cells (a stray '|' in help would break it).
    for line in doc.splitlines():
        if line.startswith("| `"):
            assert line.replace("\\|", "").count("|") == 6, line


def test_heartbeat_timeout_is_off_or_at_least_a_second():
    assert C.load_config(None, ["train.heartbeat_timeout=0"]).train.heartbeat_timeout == 0
    assert C.load_config(None, ["train.heartbeat_timeout=1"]).train.heartbeat_timeout == 1.0
    exc = error(C.load_config, None, ["train.heartbeat_timeout=0.5"])
    assert exc.key == "train.heartbeat_timeout" and "0 (off) or at least 1 second, got 0.5" in str(exc)


def test_data_header_takes_a_toml_boolean_and_model_shape_keys_override_by_precedence(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[data]\nheader = true\n[model]\nlayers = [4, 9, 3]\n")
    cfg = C.load_config(str(path))
    assert cfg.data.header == "true" and cfg.model.hidden == [9]  # hidden follows the given layers
    assert C.load_config(str(path), ["data.header=false"]).data.header == "false"
    assert error(C.load_config, None, ["data.header=maybe"]).key == "data.header"
    later = C.load_config(str(path), ["model.hidden=[5]"])  # --set over the file's shape: the file's layers go
    assert (later.model.layers, later.model.hidden) == ([], [5])
    assert error(C.load_config, None, ["model.layers=[4,9,3]", "model.hidden=[5]"]).key == "model.hidden"
    assert C.load_config(None, ["model.layers=[4,9,3]", "model.hidden=[9]"]).model.layers == [4, 9, 3]
    assert error(C.load_config, None, ["data.normalize_targets=standard"]).key == "data.normalize_targets"


@pytest.mark.parametrize("key,when", [(k, w) for k, w, _ in C._APPLIES])
def test_a_key_that_would_change_nothing_is_refused_by_name(key, when):
    """No key is silently ignored: a non-default value where it does nothing is refused, naming the key and
    the setting it needs; with that setting it is accepted."""
    field = C._fields(key.split(".")[0])[key.split(".")[1]]
    default = getattr(getattr(C.default_config(), key.split(".")[0]), key.split(".")[1])
    other = {bool: (not default), int: default + 1, float: default / 2 if default else 0.001,
             str: "spirals"}.get(field[0], 0.5)  # 0.5: model.dropout, a number or a list
    off = {"train.optimizer": "sgd", "train.schedule": "constant", "train.on_nonfinite": "stop",
           "train.early_stopping_patience": 0, "checkpoint.keep_best": False, "data.val": "xor", "model.hidden": []}
    on = {"train.momentum": ["train.optimizer=momentum"], "train.nesterov": ["train.optimizer=momentum"],
          "train.beta1": [], "train.beta2": [], "train.rho": ["train.optimizer=rmsprop"], "train.eps": [],
          "train.step_epochs": ["train.schedule=step"], "train.gamma": ["train.schedule=step"],
          "train.min_lr": ["train.schedule=cosine"], "train.max_skipped_steps": ["train.on_nonfinite=skip"],
          "train.plateau_patience": ["train.schedule=plateau"], "train.plateau_cooldown": ["train.schedule=plateau"],
          "train.min_delta": [], "data.val_fraction": [], "model.dropout": [], "model.batch_norm": []}[key]
    value = C._toml_value(other)
    refused_with = [f"{k}={C._toml_value(v)}" for k, v in off.items() if k.split(".")[1] in when or k in when]
    err = error(C.load_config, None, [*refused_with, f"{key}={value}"])
    assert err.key == key and "would change nothing" in str(err) and when in str(err)
    assert getattr(getattr(C.load_config(None, [*on, f"{key}={value}"]), key.split(".")[0]),
                   key.split(".")[1]) == other


def test_every_retired_key_is_named_at_once(tmp_path):
    """A full config written by an earlier dpbp's `config show` holds every retired key: name them all."""
    old = tmp_path / "old.toml"
    old.write_text('[train]\nshard_optimizer = "auto"\noverlap_allreduce = false\nbucket_mb = 4.0\n')
    err = error(C.load_config, str(old), [])
    assert all(k in str(err) for k in ("train.shard_optimizer", "train.overlap_allreduce", "train.bucket_mb"))
