"""The MLP engine: gradients against finite differences and a per-sample reference, layout, dtypes."""

from __future__ import annotations

import itertools
import tracemalloc

import numpy as np
import pytest

from dpbp import MLP, ops
from dpbp.gradcheck import check_gradients

PAIRINGS = [(out, loss) for loss, outs in ops.LOSS_OUTPUTS.items() for out in outs]
CASES = list(itertools.product(ops.HIDDEN_ACTIVATIONS, PAIRINGS))


def make_problem(activation, output, loss, label_kind="ids", n=7, sizes=(4, 5, 6, 3), seed=1):
    """A small float64 model and a batch whose pre-activations stay away from relu kinks."""
    rng = np.random.default_rng(seed)
    model = MLP(list(sizes), activation=activation, output=output, loss=loss, dtype="float64", seed=seed)
    model.params[...] = rng.normal(0, 0.5, model.n_params)  # nonzero biases too
    n_out = sizes[-1]
    X = rng.normal(0, 1, (n, sizes[0]))
    if label_kind == "ids":
        y = rng.integers(0, n_out, n)
    elif loss == "cross_entropy":
        y = rng.dirichlet(np.ones(n_out), n)  # soft rows summing to 1
    else:
        y = rng.uniform(0, 1, (n, n_out))
    return model, X, y


def reference_loss_and_grad(model, X, y):
    """The textbook formulation, one sample at a time with column vectors: z = W a + b."""
    Ws = [W.copy() for W in model.weights]
    bs = [b.copy() for b in model.biases]

    def g(name, z):
        return {
            "sigmoid": lambda: 1 / (1 + np.exp(-z)), "tanh": lambda: np.tanh(z),
            "relu": lambda: np.maximum(z, 0), "leaky_relu": lambda: np.where(z > 0, z, 0.01 * z),
            "identity": lambda: z, "softmax": lambda: np.exp(z - z.max()) / np.exp(z - z.max()).sum(),
        }[name]()

    def dg(name, z):
        s = 1 / (1 + np.exp(-z))
        return {
            "sigmoid": s * (1 - s), "tanh": 1 - np.tanh(z) ** 2, "relu": (z > 0) * 1.0,
            "leaky_relu": np.where(z > 0, 1.0, 0.01), "identity": np.ones_like(z),
        }[name]

    n_out = model.sizes[-1]
    total, gW, gb = 0.0, [np.zeros_like(W) for W in Ws], [np.zeros_like(b) for b in bs]
    for i in range(X.shape[0]):
        t = np.eye(n_out)[y[i]] if np.ndim(y[i]) == 0 else np.asarray(y[i], float)
        a, zs, acts = X[i], [], [X[i]]
        for l, (W, b) in enumerate(zip(Ws, bs)):
            z = W @ a + b
            a = g(model.activation if l < len(Ws) - 1 else model.output, z)
            zs.append(z)
            acts.append(a)
        z = zs[-1]
        if model.loss == "mse":
            total += 0.5 * np.sum((a - t) ** 2)
            dA = a - t
            if model.output == "softmax":
                delta = (np.diag(a) - np.outer(a, a)) @ dA
            else:
                delta = dA * (a * (1 - a) if model.output == "sigmoid" else 1.0)
        elif model.loss == "cross_entropy":
            total += -np.sum(t * np.log(a))
            delta = a - t
        else:
            total += -np.sum(t * np.log(a) + (1 - t) * np.log(1 - a))
            delta = a - t
        for l in range(len(Ws) - 1, -1, -1):
            gW[l] += np.outer(delta, acts[l])
            gb[l] += delta
            if l:
                delta = (Ws[l].T @ delta) * dg(model.activation, zs[l - 1])
    n = X.shape[0]
    flat = np.concatenate([np.concatenate([w.ravel(), b]) for w, b in zip(gW, gb)])
    return total / n, flat / n


@pytest.mark.parametrize("activation,pairing", CASES)
@pytest.mark.parametrize("label_kind", ["ids", "rows"])
def test_backprop_matches_finite_differences(activation, pairing, label_kind):
    output, loss = pairing
    model, X, y = make_problem(activation, output, loss, label_kind)
    checks = check_gradients(model, X, y, samples_per_layer=10**6)  # every entry of every layer
    assert [c.checked for c in checks] == [c.total for c in checks] == [25, 36, 21]
    err = max(c.max_rel_error for c in checks)
    assert err < 1e-6, f"{activation}/{output}/{loss}: largest relative error {err:.2e}"
    loss_value, _ = model.loss_and_grad(X, y)
    assert np.isclose(loss_value, model.loss_value(X, y), rtol=1e-14)


@pytest.mark.parametrize("activation,pairing", CASES)
@pytest.mark.parametrize("label_kind", ["ids", "rows"])
def test_backprop_matches_per_sample_reference(activation, pairing, label_kind):
    output, loss = pairing
    model, X, y = make_problem(activation, output, loss, label_kind, n=9, sizes=(3, 6, 4, 2), seed=5)
    loss_value, grad = model.loss_and_grad(X, y)
    ref_loss, ref_grad = reference_loss_and_grad(model, X, y)
    assert abs(loss_value - ref_loss) <= 1e-12 * max(1.0, abs(ref_loss))
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-9, atol=1e-12 * np.max(np.abs(ref_grad)))


def test_single_output_sigmoid_with_float_and_binary_ids():
    model = MLP([2, 4, 1], activation="tanh", output="sigmoid", loss="binary_cross_entropy", dtype="float64")
    X = np.array([[0.0, 1.0], [1.0, 0.5], [-1.0, 2.0]])
    as_ids = model.loss_and_grad(X, np.array([0, 1, 1]))
    as_floats = model.loss_and_grad(X, np.array([0.0, 1.0, 1.0]))
    assert as_ids[0] == as_floats[0]
    np.testing.assert_array_equal(as_ids[1], as_floats[1])
    ref = reference_loss_and_grad(model, X, np.array([[0.0], [1.0], [1.0]]))
    np.testing.assert_allclose(as_floats[1], ref[1], rtol=1e-10)


def test_binary_cross_entropy_is_stable_for_large_logits():
    model = MLP([1, 1], output="sigmoid", loss="binary_cross_entropy", dtype="float64")
    model.params[...] = [100.0, 0.0]
    loss, grad = model.loss_and_grad(np.array([[1.0], [-1.0]]), np.array([0.0, 1.0]))
    assert np.isclose(loss, 100.0, rtol=1e-12)  # log(1 + e^100) ~ 100, not inf
    assert np.all(np.isfinite(grad))


def test_sum_form_splits_like_the_full_batch():
    """The data-parallel identity: gradient sums over row blocks add up to the full-batch sum."""
    model, X, y = make_problem("tanh", "softmax", "cross_entropy", n=11)
    full = np.empty(model.n_params)
    stats = model.loss_and_grad_sum(X, y, full)
    parts, loss_sum, correct = np.zeros(model.n_params), 0.0, 0
    buf = np.empty(model.n_params)
    for lo, hi in [(0, 4), (4, 4), (4, 11)]:  # includes an empty block
        part = model.loss_and_grad_sum(X[lo:hi], y[lo:hi], buf)
        parts += buf
        loss_sum += part.loss_sum
        correct += part.n_correct
    np.testing.assert_allclose(parts, full, rtol=1e-12, atol=1e-14)
    assert np.isclose(loss_sum, stats.loss_sum, rtol=1e-12) and correct == stats.n_correct
    mean_loss, mean_grad = model.loss_and_grad(X, y)
    np.testing.assert_allclose(mean_grad, full / 11, rtol=1e-14)


def test_views_share_memory_with_params_and_layout():
    model = MLP([3, 4, 2])
    assert model.params.ndim == 1 and model.params.flags.c_contiguous
    assert model.n_params == 3 * 4 + 4 + 4 * 2 + 2
    for W, b, shape in zip(model.weights, model.biases, [(4, 3), (2, 4)]):
        assert W.shape == shape and b.shape == (shape[0],)
        assert np.shares_memory(W, model.params) and np.shares_memory(b, model.params)
    model.params[...] = np.arange(model.n_params)
    np.testing.assert_array_equal(model.weights[0].ravel(), np.arange(12))
    np.testing.assert_array_equal(model.biases[0], np.arange(12, 16))
    np.testing.assert_array_equal(model.weights[1][0], np.arange(16, 20))
    model.weights[1][...] = -1
    assert np.all(model.params[16:24] == -1)
    with pytest.raises(AttributeError):
        model.params = np.zeros(model.n_params)


def test_z_equals_W_a_plus_b():
    model = MLP([3, 2], output="identity", loss="mse", dtype="float64")
    x = np.array([1.0, -2.0, 0.5])
    np.testing.assert_allclose(model.predict(x[None])[0], model.weights[0] @ x + model.biases[0])


def test_init_rules_and_determinism():
    a = MLP([50, 400, 300, 10], activation="relu", seed=3)
    b = MLP([50, 400, 300, 10], activation="relu", seed=3)
    c = MLP([50, 400, 300, 10], activation="relu", seed=4)
    np.testing.assert_array_equal(a.params, b.params)
    assert not np.array_equal(a.params, c.params)
    assert all(np.all(bias == 0) for bias in a.biases)
    assert np.isclose(a.weights[0].std(), np.sqrt(2 / 50), rtol=0.05)  # He
    assert np.isclose(a.weights[2].std(), np.sqrt(2 / (300 + 10)), rtol=0.1)  # Xavier on the softmax layer
    t = MLP([50, 400, 10], activation="tanh", seed=3)
    assert np.isclose(t.weights[0].std(), np.sqrt(2 / 450), rtol=0.05)
    assert np.abs(t.weights[0]).max() <= np.sqrt(6 / 450)
    n = MLP([50, 400, 10], init="normal", seed=3)
    assert np.isclose(n.weights[0].std(), 0.1, rtol=0.05)
    f64 = MLP([50, 400, 300, 10], dtype="float64", seed=3)
    np.testing.assert_array_equal(a.params, f64.params.astype(np.float32))


def test_float32_stays_float32_without_large_temporaries():
    rng = np.random.default_rng(0)
    model = MLP([64, 256, 256, 10], dtype="float32")
    X = rng.normal(size=(256, 64)).astype(np.float32)
    y = rng.integers(0, 10, 256)
    buf = np.empty(model.n_params, np.float32)
    for _ in range(2):  # warm-up builds the workspace
        stats = model.loss_and_grad_sum(X, y, buf, check=False)
    tracemalloc.start()
    stats = model.loss_and_grad_sum(X, y, buf, check=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # One float64 (256, 256) temporary would be 512 KiB, a float32 one 256 KiB; NumPy's own
    # fixed-size ufunc cast buffers (8192 elements) are allowed.
    assert peak < 64 * 1024, f"a training pass allocated {peak} bytes"
    assert isinstance(stats.loss_sum, float) and buf.dtype == np.float32
    assert model.predict(X).dtype == np.float32
    loss, grad = model.loss_and_grad(X, y)
    assert grad.dtype == np.float32
    # float64 inputs are converted, not allowed to promote the model's arithmetic
    assert model.predict(X.astype(np.float64)).dtype == np.float32


def test_zero_rows_give_zero_gradient():
    model = MLP([3, 4, 2])
    buf = np.full(model.n_params, 7.0, np.float32)
    stats = model.loss_and_grad_sum(np.empty((0, 3), np.float32), np.empty(0, np.int64), buf)
    assert (stats.loss_sum, stats.n_correct, stats.n) == (0.0, 0, 0)
    assert np.all(buf == 0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"sizes": [3]}, "at least two"),
        ({"sizes": [3, 0, 2]}, "positive integers"),
        ({"sizes": [3, 2.5, 2]}, "positive integers"),
        ({"sizes": "abc"}, "positive integers"),
        ({"sizes": [3, 2], "activation": "swish"}, "unknown activation 'swish'.*relu"),
        ({"sizes": [3, 2], "output": "relu"}, "unknown output activation"),
        ({"sizes": [3, 2], "loss": "hinge"}, "unknown loss 'hinge'"),
        ({"sizes": [3, 2], "output": "softmax", "loss": "binary_cross_entropy"}, "needs a sigmoid output"),
        ({"sizes": [3, 2], "output": "sigmoid", "loss": "cross_entropy"}, "needs a softmax output"),
        ({"sizes": [3, 2], "output": "identity", "loss": "cross_entropy"}, "needs a softmax output"),
        ({"sizes": [3, 1], "output": "softmax", "loss": "mse"}, "at least 2 units"),
        ({"sizes": [3, 2], "init": "orthogonal"}, "unknown init"),
        ({"sizes": [3, 2], "dtype": "float16"}, "float32 or float64"),
    ],
)
def test_bad_construction_is_a_clear_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MLP(**kwargs)


def test_bad_batches_are_clear_value_errors():
    model = MLP([3, 4, 2])
    X = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="X has 4 features per row; this model expects 3"):
        model.predict(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="2-D"):
        model.predict(np.zeros(3))
    with pytest.raises(ValueError, match=r"NaN or Inf \(first at row 1, column 2\)"):
        model.predict(np.array([[0, 0, 0], [0, 0, np.nan]]))
    with pytest.raises(ValueError, match="NaN or Inf"):
        model.loss_and_grad(np.array([[np.inf, 0, 0]]), np.array([0]))
    with pytest.raises(ValueError, match=r"class ids in \[0, 1\], found range \[0, 2\]"):
        model.loss_and_grad(X, np.array([0, 2]))
    with pytest.raises(ValueError, match=r"class ids"):
        model.loss_and_grad(X, np.array([-1, 0]))
    with pytest.raises(ValueError, match="y has 3 rows but X has 2"):
        model.loss_and_grad(X, np.array([0, 1, 1]))
    with pytest.raises(ValueError, match=r"float targets \(batch, 2\)"):
        model.loss_and_grad(X, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="NaN"):
        MLP([3, 2], output="identity", loss="mse").loss_and_grad(X, np.array([[0, np.nan], [0, 0]]))
    with pytest.raises(ValueError, match="no rows"):
        model.loss_and_grad(np.zeros((0, 3)), np.zeros(0, int))


def test_xor_is_learnt_by_classic_backprop():
    """2-3-1 sigmoid net, MSE, plain gradient descent with a fixed eta, full batch."""
    X = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.float64)
    y = np.array([[0.0], [1.0], [1.0], [0.0]])
    model = MLP([2, 3, 1], activation="sigmoid", output="sigmoid", loss="mse", dtype="float64", seed=0)
    eta = 2.0
    for _ in range(5000):
        loss, grad = model.loss_and_grad(X, y)
        model.params[...] -= eta * grad
    assert loss < 0.01, loss
    np.testing.assert_array_equal(model.predict(X) > 0.5, y > 0.5)


def test_small_multiclass_problem_reaches_95_percent():
    from dpbp.optim import Adam

    rng = np.random.default_rng(0)
    X = rng.uniform(-1, 1, (3000, 2)).astype(np.float32)
    radius = np.hypot(X[:, 0], X[:, 1])
    y = np.where(radius < 0.45, 0, np.where(X[:, 0] * X[:, 1] > 0, 1, 2))  # a disc and two quadrant pairs
    model = MLP([2, 32, 32, 3], activation="tanh", seed=0)
    opt = Adam(model.n_params, "float32")
    train, test = slice(0, 2500), slice(2500, None)
    grads = np.empty(model.n_params, np.float32)
    for _ in range(60):
        order = rng.permutation(2500)
        for start in range(0, 2500, 50):
            idx = order[start : start + 50]
            stats = model.loss_and_grad_sum(X[idx], y[idx], grads)
            opt.step(model.params, grads, 0.01, grad_scale=1 / stats.n)
    accuracy = np.mean(np.argmax(model.predict(X[test]), axis=1) == y[test])
    assert accuracy > 0.95, accuracy
    assert train.stop == 2500


def test_moved_params_keep_values_and_views_follow():
    net = MLP([3, 4, 2], dtype="float32", seed=2)
    before = net.params.copy()
    home = np.full(net.n_params, -1.0, np.float32)
    net.move_params(home)
    np.testing.assert_array_equal(home, before)
    home[0] = 7.0  # the model now trains this buffer: writes show through W(1)
    assert net.weights[0][0, 0] == 7.0 and net.params is home
    other = np.zeros(net.n_params, np.float32)
    net.move_params(other, copy=False)  # another process already filled it
    assert net.weights[0][0, 0] == 0.0
    with pytest.raises(ValueError, match="float32"):
        net.move_params(np.zeros(net.n_params))
