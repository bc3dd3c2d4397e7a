"""dpbp export: the ONNX graph, run by onnxruntime on inputs training never saw, gives what `dpbp predict` gives,
for every hidden activation and every output layer, with the input normalisation folded in."""

from __future__ import annotations

import csv
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import invoke

from dpbp import export_onnx

ACTIVATIONS = ["sigmoid", "tanh", "relu", "leaky_relu", "identity"]
# (output, loss, data): every output layer, and both losses a softmax and a sigmoid take
OUTPUTS = [("softmax", "cross_entropy", "spirals"), ("softmax", "mse", "spirals"),
           ("sigmoid", "binary_cross_entropy", "xor"), ("sigmoid", "mse", "xor"), ("identity", "mse", "table")]
SCALE, OFFSET = np.array([1.0, 30.0]), np.array([2.0, 500.0])  # features far from standard: the folding matters


def make_table(folder):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 2)) * SCALE + OFFSET
    y = 100 + 40 * np.sin(x[:, 0]) + (x[:, 1] - 500) / 3
    np.savez(folder / "table.npz", x=x, y=y)
    return folder / "table.npz"


def train(folder, *settings):
    result = invoke("train", "--epochs", "3", "--batch-size", "32", "--set", "model.hidden=[12,7]",
                    *(a for s in settings for a in ("--set", s)), "--run-dir", folder / "run")
    assert result.exit_code == 0, result.output
    return folder / "run" / "model.npz"


def predict_both(folder, model, x, dtype=np.float32):
    """(outputs of `dpbp predict` as .npy, its CSV rows, onnxruntime's outputs by name) for raw inputs x."""
    np.save(folder / "x.npy", x)
    for out in ("p.npy", "p.csv"):
        result = invoke("predict", "--model", model, "--input", folder / "x.npy", "--output", folder / out)
        assert result.exit_code == 0, result.output
    exported = invoke("export", "--model", model, "--output", folder / "m.onnx")
    assert exported.exit_code == 0 and "wrote" in exported.output, exported.output
    session = ort.InferenceSession(str(folder / "m.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, {"input": x.astype(dtype)})))
    rows = list(csv.reader((folder / "p.csv").open()))[1:]
    return np.load(folder / "p.npy"), rows, got


@pytest.mark.parametrize("output, loss, source", OUTPUTS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_onnxruntime_equals_dpbp_predict(tmp_path, activation, output, loss, source):
    data = {"spirals": "spirals:n=300,classes=3", "xor": "xor:repeat=30", "table": make_table(tmp_path)}[source]
    model = train(tmp_path, f"data.train={data}", f"model.activation={activation}", f"model.output={output}",
                  f"model.loss={loss}")
    rng = np.random.default_rng(12345)  # new points, not the training data's
    x = rng.normal(size=(97, 2)) * (SCALE if source == "table" else 1.0) + (OFFSET if source == "table" else 0.0)
    expected, rows, got = predict_both(tmp_path, model, x)
    if output == "softmax":
        assert set(got) == {"probabilities", "label"}
        np.testing.assert_allclose(got["probabilities"], expected, rtol=1e-5, atol=1e-5)
        assert got["label"].tolist() == [int(r[0]) for r in rows]
    elif loss == "binary_cross_entropy":
        assert set(got) == {"probabilities"}
        np.testing.assert_allclose(got["probabilities"], expected, rtol=1e-5, atol=1e-5)
    else:  # a regression: in the targets' own units (scaling folded into the last layer)
        assert set(got) == {"predictions"}
        np.testing.assert_allclose(got["predictions"], expected, rtol=1e-5, atol=1e-5)
        if source == "table":
            assert 20 < np.median(expected) < 200


@pytest.mark.parametrize("normalize", ["none", "minmax"])
def test_every_normaliser_and_float64(tmp_path, normalize):
    model = train(tmp_path, f"data.train={make_table(tmp_path)}", "model.loss=mse", "model.output=identity",
                  f"data.normalize={normalize}", "model.dtype=float64")
    x = np.random.default_rng(7).normal(size=(50, 2)) * SCALE + OFFSET
    expected, _, got = predict_both(tmp_path, model, x, dtype=np.float64)
    assert got["predictions"].dtype == np.float64
    np.testing.assert_allclose(got["predictions"], expected, rtol=1e-10)


def test_text_labels_come_out_as_labels(tmp_path):
    model = train(tmp_path, "data.train=examples/iris-train.csv")
    x = np.loadtxt("examples/iris-test.csv", delimiter=",", skiprows=1, usecols=range(4))
    x = x + np.random.default_rng(3).normal(scale=0.05, size=x.shape)  # near the test flowers, none of them
    expected, rows, got = predict_both(tmp_path, model, x)
    assert got["label"].tolist() == [r[0] for r in rows]
    assert set(got["label"].tolist()) <= {"setosa", "versicolor", "virginica"}
    np.testing.assert_allclose(got["probabilities"], expected, rtol=1e-5, atol=1e-5)
    meta = {p.key: p.value for p in onnx.load(tmp_path / "m.onnx").metadata_props}
    assert meta["task"] == "classification" and '"setosa"' in meta["targets"]


def test_a_fitted_estimator_exports_from_python(tmp_path):
    from sklearn.datasets import load_iris

    from dpbp import MLPClassifier

    X, y = load_iris(return_X_y=True)
    labels = np.array(["setosa", "versicolor", "virginica"])[y]
    est = MLPClassifier((16,), max_iter=20, dtype="float32").fit(X, labels)
    path = export_onnx(est, tmp_path / "iris.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = (X + np.random.default_rng(1).normal(scale=0.1, size=X.shape)).astype(np.float32)
    proba, label = session.run(["probabilities", "label"], {"input": x})
    np.testing.assert_allclose(proba, est.predict_proba(x), rtol=1e-5, atol=1e-5)
    assert label.tolist() == est.predict(x).tolist()


@pytest.mark.parametrize("output, message, code", [
    ("m.txt", "use a .onnx file name", 2),
    ("missing/m.onnx", "does not exist", 2),
])
def test_bad_output_is_one_message(tmp_path, output, message, code):
    model = train(tmp_path, "data.train=xor:repeat=5", "model.output=sigmoid", "model.loss=binary_cross_entropy")
    result = invoke("export", "--model", model, "--output", tmp_path / output)
    assert result.exit_code == code and result.output.count("error:") == 1 and message in result.output
    assert "Traceback" not in result.output


def test_not_a_model_and_no_onnx_package(tmp_path, monkeypatch):
    (tmp_path / "x.npz").write_bytes(b"not a zip")
    result = invoke("export", "--model", tmp_path / "x.npz", "--output", tmp_path / "m.onnx")
    assert result.exit_code == 2 and result.output.startswith("error:"), result.output
    model = train(tmp_path, "data.train=xor:repeat=5", "model.output=sigmoid", "model.loss=binary_cross_entropy")
    monkeypatch.setitem(sys.modules, "onnx", None)
    result = invoke("export", "--model", model, "--output", tmp_path / "m.onnx")
    assert result.exit_code == 1 and "pip install 'dpbp[onnx]'" in result.output
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_batch_norm_folds_into_the_graph_and_dropout_leaves_no_trace(tmp_path, activation, dtype):
    model = train(tmp_path, "data.train=spirals:n=302,classes=3", f"model.activation={activation}",
                  "model.batch_norm=true", "model.dropout=0.3", f"model.dtype={dtype}")
    x = np.random.default_rng(5).normal(size=(41, 2))
    expected, _, got = predict_both(tmp_path, model, x, dtype=np.dtype(dtype))
    tolerance = 1e-10 if dtype == "float64" else 1e-5
    np.testing.assert_allclose(got["probabilities"], expected, rtol=tolerance, atol=tolerance)
    ops_used = {node.op_type for node in onnx.load(tmp_path / "m.onnx").graph.node}
    assert "BatchNormalization" not in ops_used and "Dropout" not in ops_used
