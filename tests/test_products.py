"""The matrix products' backends (dpbp/products.py): bf16-mixed error bounds, torch float32, refusals, threads.

bfloat16 keeps 8 significant bits, so rounding a number to it has relative error at most
u = 2^-8 (round to nearest). A bf16-mixed product rounds both inputs (a product of two rounded
inputs is off by at most 2u + u^2), accumulates the k terms in float32 (at most
gamma_k = k 2^-24 / (1 - k 2^-24) of the sum of |terms|) and rounds the result to bf16 once (u).
Hence, elementwise, with |A||B| the product of the absolute values:

    |C_bf16 - A B| <= u |A B| + (1 + u) (2u + u^2 + gamma_k (1 + u)^2) |A||B|

and, against the exact product of the bf16-rounded inputs A16 B16 (only accumulation and the
final rounding left):

    |C_bf16 - A16 B16| <= u |A16 B16| + gamma_k (1 + u) |A16||B16|.
"""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest
import torch  # the test extra pins torch==2.13.0 (pyproject.toml)
from helpers import invoke, small_config

from dpbp import products
from dpbp.comm import SerialComm
from dpbp.errors import MissingExtraError
from dpbp.model import MLP, StepContext
from dpbp.products import TorchBF16Products, TorchProducts, UnsupportedCPUError, make_products
from dpbp.threads import configure_blas_threads
from dpbp.train import Trainer

U = 2.0**-8  # bfloat16 unit roundoff


def gamma(k: int) -> float:
    return k * 2.0**-24 / (1 - k * 2.0**-24)


def round_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> nearest bfloat16 (ties to even), returned as float32; written on the bits, not through torch."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


def three_products(p, A, W, delta):
    """forward A W^T, weights delta^T A, backprop delta W through backend ``p`` (float32 outputs)."""
    n, k_in = A.shape
    out = W.shape[0]
    Z, G, P = np.empty((n, out), np.float32), np.empty((out, k_in), np.float32), np.empty((n, k_in), np.float32)
    p.forward(0, A, W, Z)
    p.weight_grad(0, delta, A, G)
    p.backprop(0, delta, W, P)
    # (x, y, result) with result ~ x @ y
    return [(A, W.T, Z), (delta.T, A, G), (delta, W, P)]


@pytest.fixture
def bf16_cpu(monkeypatch, tmp_path):
    """Pretend to be a CPU with AVX-512 BF16, so the bf16 tests run on any x86 host."""
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16\n")
    monkeypatch.setattr(products, "CPUINFO", info)


def test_bf16_products_meet_the_stated_bound_on_random_data(bf16_cpu):
    rng = np.random.default_rng(0)
    A = rng.standard_normal((64, 96), dtype=np.float32)
    W = rng.standard_normal((80, 96), dtype=np.float32)
    delta = rng.standard_normal((64, 80), dtype=np.float32)
    worst = 0.0
    for x, y, got in three_products(make_products("auto", "bf16-mixed", "float32"), A, W, delta):
        k = x.shape[1]
        exact = x.astype(np.float64) @ y.astype(np.float64)
        size = np.abs(x).astype(np.float64) @ np.abs(y).astype(np.float64)
        bound = U * np.abs(exact) + (1 + U) * (2 * U + U * U + gamma(k) * (1 + U) ** 2) * size
        err = np.abs(got - exact)
        assert np.all(err <= bound), float(np.max(err / bound))
        x16, y16 = round_bf16(x).astype(np.float64), round_bf16(y).astype(np.float64)
        exact16 = x16 @ y16
        bound16 = U * np.abs(exact16) + gamma(k) * (1 + U) * (np.abs(x16) @ np.abs(y16))
        assert np.all(np.abs(got - exact16) <= bound16)
        worst = max(worst, float(np.max(err / np.abs(exact))))
    assert worst > U / 4  # bf16 rounding is visible: float32 products would be ~1e-6 off at most


def test_bf16_rounds_the_inputs_not_only_the_result(bf16_cpu):
    """1 + 3*2^-9 rounds to 1 + 2^-7 in bf16; against a row of -1 the difference is exact in bf16.

    Rounding only the float32 result would give 3*2^-9 (exactly representable); bf16 inputs give 2^-7.
    """
    a = np.float32(1 + 3 * 2.0**-9)
    A = np.array([[a, 1.0]] * 4, np.float32)  # (4, 2)
    W = np.array([[1.0, -1.0], [2.0, -2.0], [0.5, -0.5]], np.float32)  # (3, 2)
    delta = np.array([[1.0, 0.0, 0.0]] * 4, np.float32)  # (4, 3)
    (_, _, Z), (_, _, G), (_, _, P) = three_products(make_products("torch", "bf16-mixed", "float32"), A, W, delta)
    np.testing.assert_array_equal(Z, np.tile([2.0**-7, 2.0**-6, 2.0**-8], (4, 1)).astype(np.float32))
    np.testing.assert_array_equal(G[0], [4 * round_bf16(np.array([a]))[0], 4.0])  # sum of 4 rows of delta^T A
    np.testing.assert_array_equal(P, np.tile([1.0, -1.0], (4, 1)).astype(np.float32))


def test_bf16_step_gradient_is_within_the_bf16_error_of_the_float32_step(bf16_cpu):
    """The gradient of one bf16-mixed step against the float32 step of the same weights and rows.

    First-order bound: layer 1's gradient passes through every product of the step, 3L - 1 = 8 of
    them for L = 3 layers, each adding at most 3u relative error (two inputs and the result) in norm
    for data without cancellation, so ||g16 - g|| <= 8 * 3u ||g|| = 0.094 ||g||. bf16 must show:
    float32 products agree to ~1e-6.
    """
    rng = np.random.default_rng(1)
    X = rng.standard_normal((256, 20)).astype(np.float32)
    y = rng.integers(0, 5, 256)
    full = MLP([20, 32, 32, 5], dtype="float32", seed=3)
    mixed = MLP([20, 32, 32, 5], dtype="float32", seed=3, precision="bf16-mixed")
    g, g16 = np.empty(full.n_params, np.float32), np.empty(full.n_params, np.float32)
    s, s16 = full.loss_and_grad_sum(X, y, g), mixed.loss_and_grad_sum(X, y, g16)
    assert g16.dtype == np.float32 and mixed.params.dtype == np.float32  # master weights and sums stay float32
    rel = float(np.linalg.norm(g16 - g) / np.linalg.norm(g))
    assert rel <= 8 * 3 * U, rel
    assert rel > 1e-4, rel  # the products really ran in bf16
    assert abs(s16.loss_sum - s.loss_sum) <= 8 * 3 * U * s.loss_sum
    for (wi, _), (wj, _) in zip(full.layer_slices(), mixed.layer_slices()):  # every layer's gradient, not only the sum
        assert np.linalg.norm(g16[wj] - g[wi]) <= 8 * 3 * U * np.linalg.norm(g[wi])


@pytest.mark.parametrize("activation, dropout, batch_norm, fused", [
    ("relu", 0.0, False, True), ("leaky_relu", 0.0, False, True), ("identity", 0.0, False, True),
    ("tanh", 0.0, False, False), ("sigmoid", 0.0, False, False),
    ("relu", 0.2, False, False), ("relu", 0.0, True, False),
])
def test_every_bf16_path_meets_the_step_bound(bf16_cpu, activation, dropout, batch_norm, fused):
    """The bound of the test above on each bf16-mixed path: hidden layers kept in bf16 by the backend
    (piecewise-linear activations, no dropout or batch norm), or the float32 element-wise path."""
    rng = np.random.default_rng(4)
    X = rng.standard_normal((256, 20)).astype(np.float32)
    y = rng.integers(0, 5, 256)
    kw = dict(activation=activation, dropout=dropout, batch_norm=batch_norm, dtype="float32", seed=3)
    full, mixed = MLP([20, 32, 32, 5], **kw), MLP([20, 32, 32, 5], precision="bf16-mixed", **kw)
    assert mixed.fused is fused and full.fused is False
    g, g16 = np.empty(full.n_params, np.float32), np.empty(full.n_params, np.float32)
    context = StepContext(epoch=1, step=2)
    full.loss_and_grad_sum(X, y, g, context=context)
    mixed.loss_and_grad_sum(X, y, g16, context=context)
    for (wi, bi), _ in zip(full.layer_slices(), mixed.layer_slices()):
        for part in (wi, bi):
            assert np.linalg.norm(g16[part] - g[part]) <= 8 * 3 * U * np.linalg.norm(g[part])
    rel = float(np.linalg.norm(g16 - g) / np.linalg.norm(g))
    assert 1e-4 < rel <= 8 * 3 * U, rel


def test_a_bf16_model_without_hidden_layers_has_nothing_to_keep_in_bf16(bf16_cpu):
    assert not MLP([30, 4], precision="bf16-mixed", dtype="float32").fused
    assert MLP([30, 5, 4], precision="bf16-mixed", dtype="float32").fused


def test_a_bf16_pass_does_not_depend_on_the_passes_before(bf16_cpu):
    """The backend keeps bf16 copies between calls; none may leak from one pass into the next.

    Same weights, same rows: the gradient after passes over other rows (and another row count)
    is bit for bit the gradient of a fresh model's first pass.
    """
    rng = np.random.default_rng(5)
    X1, X2, X3 = (rng.standard_normal((n, 12)).astype(np.float32) for n in (64, 7, 64))
    y1, y2, y3 = (rng.integers(0, 4, X.shape[0]) for X in (X1, X2, X3))
    used, fresh = (MLP([12, 24, 16, 4], dtype="float32", seed=6, precision="bf16-mixed") for _ in range(2))
    assert used.fused
    g, want = np.empty(used.n_params, np.float32), np.empty(used.n_params, np.float32)
    buf = np.empty_like(X1)  # the trainer's way: every batch gathered into the same buffer
    used.loss_and_grad_sum(X2, y2, g)  # another row count
    np.copyto(buf, X1)
    used.loss_and_grad_sum(buf, y1, g)
    np.copyto(buf, X3)  # the same row count again: the same buffers, new contents
    used.loss_and_grad_sum(buf, y3, g)
    fresh.loss_and_grad_sum(X3.copy(), y3, want)
    np.testing.assert_array_equal(g, want)


def test_a_bf16_hidden_layer_rounds_once_after_the_bias(bf16_cpu):
    """hidden_forward: g(bf16(A16 W16^T + b16)): one rounding of the float32 sum, bias included."""
    rng = np.random.default_rng(7)
    A = rng.standard_normal((32, 48), dtype=np.float32)
    W = rng.standard_normal((40, 48), dtype=np.float32)
    b = rng.standard_normal(40, dtype=np.float32) * 4
    backend = make_products("auto", "bf16-mixed", "float32")
    got = backend.hidden_forward(0, A, W, b, "identity").float().numpy()
    A16, W16, b16 = (round_bf16(x).astype(np.float64) for x in (A, W, b))
    exact = A16 @ W16.T + b16
    bound = U * np.abs(exact) + gamma(49) * (1 + U) * (np.abs(A16) @ np.abs(W16.T) + np.abs(b16))
    assert np.all(np.abs(got - exact) <= bound)
    np.testing.assert_array_equal(round_bf16(got), got)  # the result is a bf16 value
    relu = backend.hidden_forward(0, A, W, b, "relu").float().numpy()
    np.testing.assert_array_equal(relu, np.maximum(got, 0))
    # the bias gradient of a bf16 delta: its column sums, added in float32, rounded to bf16 once
    delta = torch.from_numpy(rng.standard_normal((32, 40), dtype=np.float32)).bfloat16()
    db = np.empty(40, np.float32)
    backend.bias_grad(0, delta, db)
    d = delta.float().numpy().astype(np.float64)
    exact = d.sum(axis=0)
    assert np.all(np.abs(db - exact) <= U * np.abs(exact) + gamma(32) * (1 + U) * np.abs(d).sum(axis=0))
    np.testing.assert_array_equal(round_bf16(db), db)


def test_torch_float32_products_match_numpy(monkeypatch):
    calls = []
    real = torch.matmul
    monkeypatch.setattr(torch, "matmul", lambda *a, **k: calls.append(1) or real(*a, **k))
    rng = np.random.default_rng(2)
    X, y = rng.standard_normal((40, 6)), rng.integers(0, 3, 40)
    ref = MLP([6, 7, 3], dtype="float64", seed=0)
    via = MLP([6, 7, 3], dtype="float64", seed=0, products="torch")
    assert isinstance(via.products, TorchProducts) and via.products.describe().startswith("PyTorch")
    g, gt = np.empty(ref.n_params), np.empty(ref.n_params)
    ref.loss_and_grad_sum(X, y, g)
    via.loss_and_grad_sum(X, y, gt)
    assert len(calls) == 2 + 2 + 1  # forward per layer, dW per layer, delta_prev above the input layer
    np.testing.assert_allclose(gt, g, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(via.predict(X), ref.predict(X), rtol=1e-12)


def test_auto_chooses_numpy_for_full_precision_and_torch_for_bf16(bf16_cpu):
    assert make_products("auto", "full", "float32").name == "numpy"
    assert make_products("auto", "full", "float64").name == "numpy"
    assert isinstance(make_products("auto", "bf16-mixed", "float32"), TorchBF16Products)
    with pytest.raises(ValueError, match="needs dtype float32"):
        make_products("auto", "bf16-mixed", "float64")
    with pytest.raises(ValueError, match="NumPy has no bfloat16"):
        make_products("numpy", "bf16-mixed", "float32")


@pytest.mark.parametrize("flags, ok", [("avx512f avx512_bf16", True), ("amx_tile amx_bf16", True),
                                       ("avx2 avx512f avx512_vnni", False)])
def test_bf16_needs_avx512_bf16_or_amx(monkeypatch, tmp_path, flags, ok):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nflags\t\t: fpu {flags}\n")
    monkeypatch.setattr(products, "CPUINFO", info)
    if ok:
        assert MLP([3, 2], precision="bf16-mixed").precision == "bf16-mixed"
    else:
        with pytest.raises(UnsupportedCPUError, match="avx512_bf16 .*amx_bf16.*model.precision = full"):
            MLP([3, 2], precision="bf16-mixed")
    assert products.bf16_support()["amx_bf16"] is ("amx_bf16" in flags)


def test_unreadable_cpu_flags_refuse_bf16(monkeypatch, tmp_path):
    monkeypatch.setattr(products, "CPUINFO", tmp_path / "missing")
    assert "unknown" in products.describe_cpu()
    with pytest.raises(UnsupportedCPUError, match="could not be read"):
        make_products("auto", "bf16-mixed", "float32")


def test_cli_refuses_bf16_on_a_cpu_without_it_once(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("flags\t\t: fpu avx2\n")
    monkeypatch.setattr(products, "CPUINFO", info)
    result = invoke("train", "--set", "data.train=spirals:n=300", "--set", "model.layers=[2,8,3]",
                    "--set", "model.precision=bf16-mixed", "--run-dir", tmp_path / "run")
    assert result.exit_code == 1, result.output
    errors = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "avx512_bf16" in errors[0] and "Traceback" not in result.output, result.output
    assert not (tmp_path / "run" / "model.npz").exists()


def test_missing_torch_is_a_missing_extra_error(monkeypatch, bf16_cpu):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    for args in (("torch", "full"), ("auto", "bf16-mixed")):
        with pytest.raises(MissingExtraError, match=r"pip install 'dpbp\[torch\]'"):
            make_products(args[0], args[1], "float32")
    assert make_products("auto", "full", "float32").name == "numpy"  # the default install needs no torch


def test_torch_threads_follow_the_rank_thread_count():
    from threadpoolctl import threadpool_info

    def blas_threads():
        return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}

    before, blas_before = torch.get_num_threads(), max(blas_threads())
    try:
        assert configure_blas_threads(1, 1) == 1 and torch.get_num_threads() == 1 and blas_threads() == {1}
        assert configure_blas_threads(2, 1) == 2 and torch.get_num_threads() == 2 and blas_threads() == {2}
        # PyTorch does the products: its pool takes the threads, NumPy's BLAS (bias sums only) keeps one
        assert configure_blas_threads(2, 1, "torch") == 2 and torch.get_num_threads() == 2 and blas_threads() == {1}
    finally:
        torch.set_num_threads(before)
        configure_blas_threads(blas_before, 1)


def test_bf16_training_keeps_float32_state_and_learns(bf16_cpu):
    cfg = small_config("model.precision=bf16-mixed", "train.epochs=4", dtype="float32")
    trainer = Trainer(cfg, SerialComm(), echo=lambda text: None)
    assert trainer.model.products.precision == "bf16-mixed"
    assert trainer.exchange.grad.dtype == np.float32 and trainer.model.params.dtype == np.float32
    assert sorted(trainer.optimizer.state) == ["m", "v"]  # adam's moments
    assert all(a.dtype == np.float32 for a in trainer.optimizer.state.values())
    result = trainer.run()
    history = result.history
    assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"], history
    ref = Trainer(small_config("train.epochs=4", dtype="float32"), SerialComm(), echo=lambda text: None).run()
    assert abs(history[-1]["val_accuracy"] - ref.history[-1]["val_accuracy"]) <= 0.1


def test_header_and_info_name_the_library_and_the_cpu(tmp_path, bf16_cpu):
    result = invoke("train", "--set", "data.train=spirals:n=300", "--set", "model.layers=[2,8,3]",
                    "--set", "model.precision=bf16-mixed", "--epochs", "1", "--run-dir", tmp_path / "run")
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if "matrix products" in x)
    assert "PyTorch" in line and "bf16" in line and "AVX-512 BF16 yes" in line and "AMX no" in line, line
    assert re.search(r"1 rank x \d+ PyTorch threads?,", result.output), result.output  # not "BLAS threads"
    assert "hidden activations (relu) in bf16 between the products" in line, line
    result = invoke("train", "--set", "data.train=spirals:n=300", "--set", "model.layers=[2,8,3]",
                    "--set", "model.precision=bf16-mixed", "--set", "model.activation=tanh", "--set",
                    "model.dropout=0.1", "--epochs", "1", "--run-dir", tmp_path / "other")
    line = next(x for x in result.output.splitlines() if "matrix products" in x)
    assert "hidden activations in float32 (NumPy; activation tanh, dropout)" in line, line
    result = invoke("info")
    lines = {x.split("  ")[0]: x for x in result.output.splitlines()}
    assert "torch" in lines["products"] and "numpy" in lines["products"], result.output
    assert "AVX-512 BF16 yes" in lines["CPU bf16"]


def test_a_bf16_model_evaluates_in_full_precision_like_its_saved_copy(tmp_path, bf16_cpu):
    """Validation during training, predict and `dpbp evaluate` on the saved model give the same numbers."""
    import json

    from dpbp.checkpoint import load_model

    run = tmp_path / "run"
    result = invoke("train", "--set", "data.train=spirals:n=600", "--set", "model.layers=[2,16,16,3]",
                    "--set", "model.precision=bf16-mixed", "--set", "data.test=spirals:n=300,noise=0.3",
                    "--epochs", "2", "--run-dir", run)
    assert result.exit_code == 0, result.output
    reported = json.loads((run / "final_metrics.json").read_text())["test"]
    result = invoke("evaluate", "--model", run / "model.npz", "--data", "spirals:n=300,noise=0.3", "--json")
    assert result.exit_code == 0, result.output
    evaluated = json.loads(result.output)
    assert evaluated["loss"] == reported["loss"] and evaluated["accuracy"] == reported["accuracy"]
    trained = MLP([2, 16, 16, 3], dtype="float32", precision="bf16-mixed", seed=3)
    full = MLP([2, 16, 16, 3], dtype="float32", seed=3)
    X = np.random.default_rng(0).standard_normal((50, 2)).astype(np.float32)
    np.testing.assert_array_equal(trained.predict(X), full.predict(X))
    torch32 = MLP([2, 16, 16, 3], dtype="float32", products="torch", seed=3)
    np.testing.assert_array_equal(torch32.predict(X), full.predict(X))  # as the saved model predicts
    assert load_model(run / "model.npz").products.precision == "full"


def test_bf16_scratch_buffers_are_reused_in_a_deep_network(bf16_cpu):
    """12 hidden layers: after the first steps every bf16 buffer is reused (it was reallocated every step)."""
    cfg = small_config("model.precision=bf16-mixed", "model.layers=[2,16,16,16,16,16,16,16,16,16,16,16,16,3]",
                       "train.epochs=1", dtype="float32")
    trainer = Trainer(cfg, SerialComm(), echo=lambda text: None)
    backend = trainer.model.products
    made = []
    real = backend.torch.empty
    order = np.arange(trainer.data.train.n_samples)
    trainer.step(order, 0)
    backend.torch = type("T", (), {"__getattr__": lambda self, name: getattr(torch, name),
                                   "empty": staticmethod(lambda *a, **k: made.append(a) or real(*a, **k))})()
    for i in range(1, 4):
        trainer.step(order, i)
    assert made == []


def test_a_run_may_continue_in_another_precision(tmp_path, bf16_cpu):
    run = tmp_path / "run"
    common = ["--set", "data.train=spirals:n=300", "--set", "model.layers=[2,8,3]", "--run-dir", run]
    result = invoke("train", *common, "--epochs", "1")
    assert result.exit_code == 0, result.output
    result = invoke("train", *common, "--epochs", "2", "--resume", "auto", "--set", "model.precision=bf16-mixed")
    assert result.exit_code == 0, result.output
    assert "bf16" in next(x for x in result.output.splitlines() if "matrix products" in x)
    result = invoke("train", *common, "--epochs", "3", "--resume", "auto", "--set", "model.precision=full")
    assert result.exit_code == 0, result.output
    result = invoke("train", *common, "--epochs", "4", "--resume", "auto", "--set", "model.activation=tanh")
    assert result.exit_code == 2 and "activation: checkpoint 'relu'" in result.output  # the model stays frozen
