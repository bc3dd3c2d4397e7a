"""dpbp.MLPClassifier and dpbp.MLPRegressor: scikit-learn's own checks, pipelines and searches on real data,
and that fit drives the very Trainer `dpbp train` runs (same data preparation, same numbers, same files)."""

from __future__ import annotations

import importlib
import json
import sys

import numpy as np
import pandas as pd
import pytest
from helpers import invoke
from sklearn.datasets import load_diabetes, load_iris
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from dpbp import MLPClassifier, MLPRegressor, data
from dpbp.checkpoint import load_network
from dpbp.comm import SerialComm
from dpbp.errors import InputError, MissingExtraError
from dpbp.train import evaluate


# Default parameters, as a user gets them. Every check runs; none is expected to fail.
@parametrize_with_checks([MLPClassifier(), MLPRegressor()])
def test_scikit_learn_estimator_checks(estimator, check):
    check(estimator)


def iris():
    X, y = load_iris(return_X_y=True)
    names = np.array(["setosa", "versicolor", "virginica"])[y]
    return train_test_split(X, names, test_size=0.3, random_state=0, stratify=names)


def test_classifier_in_a_pipeline_with_grid_search_on_iris():
    X_train, X_test, y_train, y_test = iris()
    pipe = make_pipeline(StandardScaler(), MLPClassifier(normalize="none", random_state=0, max_iter=100))
    grid = GridSearchCV(pipe, {"mlpclassifier__hidden_layer_sizes": [(8,), (32,)],
                               "mlpclassifier__learning_rate_init": [0.001, 0.01]}, cv=3)
    grid.fit(X_train, y_train)
    assert len(grid.cv_results_["params"]) == 4
    assert grid.best_score_ > 0.9
    assert grid.score(X_test, y_test) > 0.9  # 45 flowers the search never saw
    assert set(grid.predict(X_test)) <= {"setosa", "versicolor", "virginica"}
    assert grid.best_estimator_[-1].classes_.tolist() == ["setosa", "versicolor", "virginica"]


def test_regressor_in_a_pipeline_with_grid_search_on_diabetes():
    X, y = load_diabetes(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0)
    grid = GridSearchCV(make_pipeline(StandardScaler(), MLPRegressor(random_state=0)),
                        {"mlpregressor__hidden_layer_sizes": [(16,), (64,)], "mlpregressor__max_iter": [100, 200]},
                        cv=3)
    grid.fit(X_train, y_train)
    # R^2 on 111 held-out patients: scikit-learn's MLPRegressor gets 0.28-0.31 on this split, a linear model 0.36
    assert grid.score(X_test, y_test) > 0.25
    pred = grid.predict(X_test)
    assert pred.shape == (len(X_test),) and 50 < pred.mean() < 250  # the targets' own units


def test_fit_trains_what_dpbp_train_trains(tmp_path):
    """Same data, same settings: the estimator's model.npz equals the CLI's bit for bit (one Trainer, one
    data preparation), and so do the per-epoch losses."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(157, 3)) * [1, 10, 100] + [0, 5, -50]
    y = np.where(X[:, 0] + X[:, 1] / 10 > 0.3, "yes", "no")
    np.savez(tmp_path / "d.npz", x=X, y=y)
    cli = invoke("train", "--set", f"data.train={tmp_path / 'd.npz'}", "--set", "model.hidden=[16, 8]",
                 "--set", "model.activation=tanh", "--set", "model.dtype=float64", "--set", "data.val_fraction=0.2",
                 "--set", "train.early_stopping_patience=10", "--set", "train.min_delta=0.0001",
                 "--set", "checkpoint.restore_best=true",
                 "--epochs", "7", "--batch-size", "20", "--lr", "0.01", "--seed", "3", "--run-dir", tmp_path / "cli")
    assert cli.exit_code == 0, cli.output
    est = MLPClassifier((16, 8), "tanh", batch_size=20, max_iter=7, learning_rate_init=0.01, random_state=3,
                        early_stopping=True, validation_fraction=0.2, run_dir=tmp_path / "runs").fit(X, y)
    assert est.run_dir_ == tmp_path / "runs" / "run-001"
    a, b = load_network(tmp_path / "cli" / "model.npz"), load_network(est.run_dir_ / "model.npz")
    np.testing.assert_array_equal(a.model.params, b.model.params)
    np.testing.assert_array_equal(est.model_.params, a.model.params)
    np.testing.assert_array_equal(a.inputs.shift, est.normalizer_.shift)
    assert b.targets.classes == ["no", "yes"]
    cli_losses = [json.loads(line)["train_loss"] for line in (tmp_path / "cli" / "metrics.jsonl").open()]
    assert cli_losses == est.loss_curve_ and len(cli_losses) == 7
    assert len(est.validation_scores_) == 7 and est.n_iter_ == 7


def test_string_labels_dataframes_and_the_model_file(tmp_path):
    """A DataFrame with named columns and text labels; the fitted model's file serves `dpbp predict`."""
    X_train, X_test, y_train, y_test = iris()
    cols = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    frame = pd.DataFrame(X_train, columns=cols)
    est = MLPClassifier((32,), random_state=1, batch_size=16, learning_rate_init=0.01, run_dir=tmp_path)
    est.fit(frame, y_train)
    assert est.feature_names_in_.tolist() == cols and est.n_features_in_ == 4
    expected = est.predict(pd.DataFrame(X_test, columns=cols))
    assert expected.dtype.kind == "U" and est.score(pd.DataFrame(X_test, columns=cols), y_test) > 0.9
    np.save(tmp_path / "x.npy", X_test)
    out = invoke("predict", "--model", est.run_dir_ / "model.npz", "--input", tmp_path / "x.npy",
                 "--output", tmp_path / "p.csv")
    assert out.exit_code == 0, out.output
    labels = [line.split(",")[0] for line in (tmp_path / "p.csv").read_text().splitlines()[1:]]
    assert labels == expected.tolist()
    est.save(tmp_path / "saved.npz")  # the same model through the estimator's own save
    np.testing.assert_array_equal(load_network(tmp_path / "saved.npz").model.params, est.model_.params)
    with pytest.warns(UserWarning, match="feature names"):
        est.predict(X_test)  # scikit-learn's rule: fitted with names, called without


def test_each_fit_gets_its_own_run_directory(tmp_path):
    X, y = load_iris(return_X_y=True)
    est = MLPClassifier((8,), max_iter=3, run_dir=tmp_path)
    first = est.fit(X, y).run_dir_
    second = est.fit(X, y).run_dir_
    assert (first.name, second.name) == ("run-001", "run-002")
    for run in (first, second):
        names = {p.name for p in run.iterdir()}
        assert {"run.json", "config.toml", "metrics.jsonl", "model.npz", "checkpoints"} <= names
    assert MLPClassifier((8,), max_iter=3).fit(X, y).run_dir_ is None


def validation_loss(est, X, y_ids, fraction, seed):
    _, val = data.split_rows(len(X), fraction, seed)
    ds = data.Dataset(est.normalizer_.apply(X[val], est.model_.dtype), y_ids[val], "val")
    return evaluate(est.model_, ds, SerialComm(), est.targets_)["loss"]


def test_early_stopping_keeps_the_best_epoch_with_and_without_a_run_directory(tmp_path):
    rng = np.random.default_rng(2)
    X = rng.normal(size=(300, 5))
    y = (X[:, 0] * X[:, 1] > 0).astype(int) ^ (rng.random(300) < 0.25)  # noisy: it overfits
    kw = {"hidden_layer_sizes": (64, 64), "learning_rate_init": 0.02, "batch_size": 16, "max_iter": 30,
          "early_stopping": True, "n_iter_no_change": 8, "random_state": 0}
    mem = MLPClassifier(**kw).fit(X, y)
    disk = MLPClassifier(**kw, run_dir=tmp_path).fit(X, y)
    val = [r["val_loss"] for r in mem.history_]
    assert np.argmin(val) < len(val) - 1, "the test needs a run whose last epoch is not its best"
    np.testing.assert_array_equal(mem.model_.params, disk.model_.params)
    assert validation_loss(mem, X, y, 0.1, 0) == pytest.approx(min(val), rel=1e-12)
    assert mem.stopped_ == "early_stopping"


@pytest.mark.parametrize("cls", [MLPClassifier, MLPRegressor])
def test_partial_fit_epochs_equal_fit_epochs(cls):
    """Three partial_fit calls on the same data continue weights, optimizer state and shuffle: fit for 3 epochs."""
    X, y = load_iris(return_X_y=True)
    if cls is MLPRegressor:
        X, y = X[:, :3], X[:, 3]
    kw = {"hidden_layer_sizes": (16,), "random_state": 4, "batch_size": 32, "n_iter_no_change": None}
    whole = cls(max_iter=3, **kw).fit(X, y)
    parts = cls(**kw)
    for _ in range(3):
        parts.partial_fit(X, y, **({"classes": [0, 1, 2]} if cls is MLPClassifier else {}))
    np.testing.assert_array_equal(parts.model_.params, whole.model_.params)
    assert parts.loss_curve_ == whole.loss_curve_ and parts.n_iter_ == 3


def test_partial_fit_needs_the_classes_first_and_knows_them_after():
    X, y = load_iris(return_X_y=True)
    est = MLPClassifier((4,))
    with pytest.raises(ValueError, match="classes must be passed on the first call"):
        est.partial_fit(X, y)
    est.partial_fit(X[:50], y[:50], classes=[0, 1, 2])  # one class in this batch: the model still has three
    assert est.predict_proba(X[:2]).shape == (2, 3)
    with pytest.raises(InputError, match=r"labels not in classes_: \[7\]"):
        est.partial_fit(X[:2], [0, 7])
    with pytest.raises(ValueError, match="is not the same as classes_"):  # as scikit-learn: fixed by the first
        est.partial_fit(X[:2], [0, 1], classes=[0, 1, 2, 3])
    est.partial_fit(X[:2], [0, 1], classes=[2, 1, 0])  # the same classes in another order


def test_early_stopping_needs_a_validation_split():
    X, y = load_iris(return_X_y=True)
    with pytest.raises(ValueError, match="early_stopping=True needs validation_fraction > 0"):
        MLPClassifier((4,), early_stopping=True, validation_fraction=0.0).fit(X, y)


@pytest.mark.parametrize("params, message", [
    ({"learning_rate_init": -1.0}, r"learning_rate_init \(config train.lr: must be > 0.0, got -1.0\)"),
    ({"solver": "lbfgs"}, "lbfgs is not a mini-batch method"),
    ({"activation": "softplus"}, "activation must be one of"),
    ({"hidden_layer_sizes": (8, 0)}, "hidden_layer_sizes must be a tuple of positive integers"),
    ({"config": {"train.lr": 0.1}}, r"config\['train.lr'\]: set by learning_rate_init"),
    ({"config": {"checkpoint.keep": 2}}, "acts on the run directory's files: give run_dir"),
    ({"config": {"train.shedule": "cosine"}}, "did you mean 'train.schedule'"),
    ({"random_state": np.random.RandomState(0)}, "random_state must be None or an integer"),
    ({"comm": "tcp"}, "comm must be 'auto', 'serial' or 'mpi'"),
])
def test_bad_parameters_are_value_errors_naming_them(params, message):
    X, y = load_iris(return_X_y=True)
    with pytest.raises(InputError, match=message) as info:
        MLPClassifier(**params).fit(X, y)
    assert isinstance(info.value, ValueError)


def test_config_keys_reach_the_trainer(tmp_path):
    X, y = load_iris(return_X_y=True)
    est = MLPClassifier((8,), max_iter=4, learning_rate_init=0.01, config={"train.schedule": "cosine"}).fit(X, y)
    lrs = [r["lr"] for r in est.history_]
    assert lrs[0] == 0.01 and all(a > b > 0 for a, b in zip(lrs, lrs[1:]))  # cosine from 0.01 down


def test_estimators_without_scikit_learn_name_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")]:
        monkeypatch.setitem(sys.modules, name, None)  # importing scikit-learn now fails
    monkeypatch.delitem(sys.modules, "dpbp.estimators")
    with pytest.raises(MissingExtraError, match=r"pip install 'dpbp\[sklearn\]'"):
        importlib.import_module("dpbp.estimators")
    monkeypatch.undo()
    assert importlib.import_module("dpbp.estimators").MLPClassifier is MLPClassifier


def test_a_refusal_names_the_parameter_not_the_config_key():
    X = np.random.default_rng(0).standard_normal((201, 4))
    y = (X[:, 0] > 0).astype(int)
    est = MLPClassifier(hidden_layer_sizes=(8,), max_iter=2, config={"model.batch_norm": True})
    with pytest.raises(ValueError, match=r"leave a batch of 1; change batch_size$"):
        est.fit(X, y)  # batch_size="auto" is 200: 201 rows leave a last batch of one row


def test_the_plateau_schedule_from_an_estimator_is_explained_in_its_parameters():
    X = np.random.default_rng(0).standard_normal((300, 4))
    y = (X[:, 0] > 0).astype(int)
    plateau = {"train.schedule": "plateau"}
    with pytest.raises(ValueError, match=r"needs early_stopping=True"):
        MLPClassifier(hidden_layer_sizes=(8,), max_iter=3, config=plateau).fit(X, y)
    with pytest.raises(ValueError, match=r"set n_iter_no_change > 11") as info:
        MLPClassifier(hidden_layer_sizes=(8,), max_iter=3, config=plateau, early_stopping=True).fit(X, y)
    assert "train.early_stopping_patience" not in str(info.value)
    fitted = MLPClassifier(hidden_layer_sizes=(8,), max_iter=3, config=plateau, early_stopping=True,
                           n_iter_no_change=20).fit(X, y)
    assert len(fitted.loss_curve_) == 3
