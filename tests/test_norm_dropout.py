"""Batch normalization and dropout: against PyTorch autograd in float64, and the dropout mask's purity.

The torch network is built independently (Linear, BatchNorm1d in training mode, the activation,
then the dropout mask dpbp drew, supplied as a constant), with dpbp's parameters copied in; the
loss is the batch mean as ``MLP.loss_and_grad`` returns it.
"""

from __future__ import annotations

import numpy as np
import pytest

from dpbp import ops
from dpbp.model import BN_EPS, BN_MOMENTUM, MLP, StepContext

torch = pytest.importorskip("torch")  # the test extra installs it
F = torch.nn.functional
TORCH_ACTIVATIONS = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu,
                     "leaky_relu": lambda z: F.leaky_relu(z, ops.LEAKY_SLOPE), "identity": lambda z: z}
SIZES = [5, 7, 6, 3]
CTX = StepContext(epoch=2, step=5, offset=0)


def test_every_activation_has_a_torch_twin():
    assert sorted(TORCH_ACTIVATIONS) == sorted(ops.HIDDEN_ACTIVATIONS)


def data(n=11, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, SIZES[0])) * 2.0 + 0.5, rng.integers(0, SIZES[-1], n)


def randomised(model, seed=1):
    """Non-trivial gamma, beta and biases (initially 1, 0, 0), so every term of the formulas matters."""
    rng = np.random.default_rng(seed)
    for v in (*model.biases, *model.gammas, *model.betas):
        v[...] = rng.normal(size=v.shape)
    return model


def torch_net(model, masks, X, y, loss="cross_entropy", output="softmax"):
    """(outputs, mean loss, {name: leaf tensor}, BatchNorm1d modules) of the torch twin, forward done."""
    act = TORCH_ACTIVATIONS[model.activation]
    leaves, norms = {}, []
    a = torch.tensor(X)
    last = model.n_layers - 1
    for l in range(model.n_layers):
        W = torch.tensor(model.weights[l].copy(), requires_grad=True)
        b = torch.tensor(model.biases[l].copy(), requires_grad=True)
        leaves[f"W{l}"], leaves[f"b{l}"] = W, b
        z = F.linear(a, W, b)
        if l == last:
            break
        if model.batch_norm:
            bn = torch.nn.BatchNorm1d(z.shape[1], eps=BN_EPS, momentum=BN_MOMENTUM, dtype=torch.float64)
            with torch.no_grad():
                bn.weight.copy_(torch.tensor(model.gammas[l]))
                bn.bias.copy_(torch.tensor(model.betas[l]))
            bn.train()
            leaves[f"gamma{l}"], leaves[f"beta{l}"] = bn.weight, bn.bias
            norms.append(bn)
            z = bn(z)
        a = act(z)
        if masks[l] is not None:
            a = a * torch.tensor(masks[l])
    if output == "softmax" and loss == "cross_entropy":
        out = torch.softmax(z, dim=1)
        value = F.cross_entropy(z, torch.tensor(y))
    elif loss == "mse":
        out = {"identity": z, "sigmoid": torch.sigmoid(z), "softmax": torch.softmax(z, dim=1)}[output]
        value = 0.5 * ((out - torch.tensor(y)) ** 2).sum(dim=1).mean()
    else:
        out = torch.sigmoid(z)
        value = F.binary_cross_entropy_with_logits(z, torch.tensor(y), reduction="none").sum(dim=1).mean()
    return out, value, leaves, norms


def ours_by_name(model, grad):
    W, b = model.layer_views(grad)
    gammas, betas = model.norm_views(grad)
    named = {**{f"W{l}": w for l, w in enumerate(W)}, **{f"b{l}": v for l, v in enumerate(b)}}
    named.update({f"gamma{l}": g for l, g in enumerate(gammas)})
    named.update({f"beta{l}": v for l, v in enumerate(betas)})
    return named


def rel(a, b, floor: float = 1e-300) -> float:
    """Largest difference relative to the reference's largest entry (or ``floor``, if larger)."""
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), floor))


@pytest.mark.parametrize("activation", ops.HIDDEN_ACTIVATIONS)
@pytest.mark.parametrize("kind", ["batch_norm", "dropout", "both"])
def test_forward_and_gradients_match_torch(activation, kind):
    bn, rate = kind != "dropout", [0.3, 0.5] if kind != "batch_norm" else 0.0
    model = randomised(MLP(SIZES, activation=activation, dtype="float64", seed=3, dropout=rate, batch_norm=bn))
    X, y = data()
    masks = [model.dropout_mask(h, CTX, X.shape[0]) if model.dropout[h] else None for h in range(2)]
    if kind != "batch_norm":
        assert all((m == 0).any() and (m > 0).any() for m in masks)  # some units dropped, some kept
    out, value, leaves, norms = torch_net(model, masks, X, y)
    value.backward()
    before = model.params.copy()
    ours_out = model.forward(X, StepContext(2, 5, 0, update_running=False))
    loss, grad = model.loss_and_grad(X, y, context=CTX)
    np.testing.assert_array_equal(model.params, before)
    assert rel(ours_out, out.detach().numpy()) < 1e-9
    assert abs(loss - value.item()) <= 1e-9 * abs(value.item())
    mine = ours_by_name(model, grad)
    assert sorted(mine) == sorted(leaves)
    scale = max(float(np.max(np.abs(leaves[f"W{l}"].grad.numpy()))) for l in range(3))
    for name, leaf in leaves.items():
        ref = leaf.grad.numpy()
        if bn and name in ("b0", "b1"):  # removed by the batch mean: exactly 0 here, rounding in torch
            assert not mine[name].any() and np.max(np.abs(ref)) < 1e-12 * scale, name
        else:  # a tensor zero in exact arithmetic (beta before an identity and the next batch norm) is rounding
            assert rel(mine[name], ref, floor=1e-4 * scale) < 1e-9, name
    if bn:  # the running statistics, updated once by loss_and_grad (forward above did not)
        means, variances = model.running_views()
        for l, norm in enumerate(norms):
            assert rel(means[l], norm.running_mean.numpy()) < 1e-12
            assert rel(variances[l], norm.running_var.numpy()) < 1e-12


@pytest.mark.parametrize("loss,output", [("mse", "identity"), ("mse", "sigmoid"), ("binary_cross_entropy", "sigmoid"),
                                         ("mse", "softmax")])
def test_other_losses_match_torch_with_both(loss, output):
    sizes = [5, 7, 6, 3]
    model = randomised(MLP(sizes, activation="tanh", output=output, loss=loss, dtype="float64", seed=4, dropout=0.25,
                           batch_norm=True))
    X, _ = data()
    y = np.random.default_rng(2).uniform(size=(X.shape[0], 3))
    if output == "softmax":
        y /= y.sum(axis=1, keepdims=True)
    masks = [model.dropout_mask(h, CTX, X.shape[0]) for h in range(2)]
    _, value, leaves, _ = torch_net(model, masks, X, y, loss=loss, output=output)
    value.backward()
    loss_value, grad = model.loss_and_grad(X, y, context=CTX)
    assert abs(loss_value - value.item()) <= 1e-9 * abs(value.item())
    mine = ours_by_name(model, grad)
    for name, leaf in leaves.items():
        if name not in ("b0", "b1"):
            assert rel(mine[name], leaf.grad.numpy()) < 1e-9, name


def test_evaluation_uses_running_statistics_as_torch_eval():
    model = randomised(MLP(SIZES, activation="relu", dtype="float64", seed=5, batch_norm=True, dropout=0.5))
    X, y = data(n=13)
    for step in range(3):  # three training passes move the running statistics
        model.loss_and_grad(X, y, context=StepContext(0, step))
    # torch's running statistics after 3 steps, computed by torch.nn.BatchNorm1d itself
    ref = randomised(MLP(SIZES, activation="relu", dtype="float64", seed=5, batch_norm=True, dropout=0.5))
    act = TORCH_ACTIVATIONS["relu"]
    bns = [torch.nn.BatchNorm1d(w, eps=BN_EPS, momentum=BN_MOMENTUM, dtype=torch.float64) for w in SIZES[1:-1]]
    for l, bn in enumerate(bns):
        with torch.no_grad():
            bn.weight.copy_(torch.tensor(ref.gammas[l]))
            bn.bias.copy_(torch.tensor(ref.betas[l]))

    def run(x, masks, train):
        a = torch.tensor(x)
        for l in range(2):
            bns[l].train(train)
            a = act(bns[l](F.linear(a, torch.tensor(ref.weights[l]), torch.tensor(ref.biases[l]))))
            if masks is not None:
                a = a * torch.tensor(masks[l])
        return torch.softmax(F.linear(a, torch.tensor(ref.weights[2]), torch.tensor(ref.biases[2])), dim=1)

    with torch.no_grad():
        for step in range(3):
            run(X, [ref.dropout_mask(h, StepContext(0, step), X.shape[0]) for h in range(2)], True)
        means, variances = model.running_views()
        for l, bn in enumerate(bns):
            assert rel(means[l], bn.running_mean.numpy()) < 1e-12
            assert rel(variances[l], bn.running_var.numpy()) < 1e-12
        new = np.random.default_rng(9).normal(size=(4, SIZES[0]))
        assert rel(model.predict(new), run(new, None, False).numpy()) < 1e-12  # no dropout, running statistics
        stats = model.evaluate_sum(new, np.zeros(4, int))
        assert stats.n == 4


def test_dropout_mask_is_a_pure_function_of_the_global_row():
    model = MLP([3, 37, 5, 2], dtype="float32", seed=7, dropout=[0.4, 0.2])
    whole = model.dropout_mask(0, StepContext(1, 4, 0), 50)
    parts = [model.dropout_mask(0, StepContext(1, 4, lo), hi - lo) for lo, hi in ((0, 17), (17, 18), (18, 18),
                                                                                   (18, 50))]
    np.testing.assert_array_equal(np.concatenate(parts), whole)  # any split of the rows: the same mask
    for other in (StepContext(2, 4, 0), StepContext(1, 5, 0)):
        assert not np.array_equal(model.dropout_mask(0, other, 50), whole)
    assert not np.array_equal(MLP([3, 37, 5, 2], seed=8, dropout=0.4).dropout_mask(0, StepContext(1, 4), 50), whole)
    assert set(np.unique(whole)) == {0.0, np.float32(1 / 0.6)} and whole.dtype == np.float32
    second = model.dropout_mask(1, StepContext(1, 4, 0), 50)
    assert second.shape == (50, 5) and not np.array_equal(second[:, :5], whole[:, :5] * 0.6 / 0.8)


def test_dropout_keeps_each_unit_with_probability_one_minus_p():
    model = MLP([2, 1000, 2], dtype="float64", dropout=0.3)
    kept = np.count_nonzero(model.dropout_mask(0, StepContext(), 400)) / 400_000
    assert abs(kept - 0.7) < 5 * np.sqrt(0.21 / 400_000)  # five standard deviations


def test_dropout_is_off_in_evaluation_and_needs_a_context_in_training():
    model = MLP([3, 16, 2], dtype="float64", dropout=0.5)
    plain = MLP([3, 16, 2], dtype="float64")
    X = np.random.default_rng(0).normal(size=(6, 3))
    np.testing.assert_array_equal(model.predict(X), plain.predict(X))
    assert not np.array_equal(model.forward(X, StepContext()), plain.predict(X))
    with pytest.raises(ValueError, match="needs a StepContext"):
        model.loss_and_grad(X, np.zeros(6, int))


def test_batch_norm_needs_two_rows_and_keeps_the_layout():
    model = MLP([3, 4, 5, 2], dtype="float64", batch_norm=True)
    assert model.n_params == (3 + 1) * 4 + (4 + 1) * 5 + (5 + 1) * 2 + 2 * (4 + 5)
    assert [(a, b) for a, b in model.layer_blocks()] == [(0, 24), (24, 59), (59, 71)]
    assert all(np.all(g == 1) for g in model.gammas) and all(not b.any() for b in model.betas)
    with pytest.raises(ValueError, match="at least 2 rows"):
        model.loss_and_grad(np.ones((1, 3)), np.zeros(1, int))


def test_refuses_bad_rates():
    with pytest.raises(ValueError, match="one per hidden layer"):
        MLP([2, 3, 3, 2], dropout=[0.1])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        MLP([2, 3, 2], dropout=1.0)


@pytest.mark.parametrize("activation", ops.HIDDEN_ACTIVATIONS)
def test_gradcheck_covers_batch_norm_and_a_fixed_dropout_mask(activation):
    from dpbp.gradcheck import check_gradients

    model = randomised(MLP([4, 6, 5, 3], activation=activation, dtype="float64", seed=2, dropout=0.3,
                           batch_norm=True))
    X, y = np.random.default_rng(4).normal(size=(9, 4)), np.arange(9) % 3
    running = (model.running_mean.copy(), model.running_var.copy())
    checks = check_gradients(model, X, y, samples_per_layer=1000)
    assert [c.total for c in checks] == [4 * 6 + 6 + 12, 6 * 5 + 5 + 10, 5 * 3 + 3]  # gamma, beta included
    assert all(c.checked + c.kinks == c.total for c in checks)
    assert max(c.max_rel_error for c in checks) < 1e-6, checks
    np.testing.assert_array_equal(model.running_mean, running[0])
    np.testing.assert_array_equal(model.running_var, running[1])


# ----------------------------------------------------------------------------- in training runs


def quiet_trainer(cfg, run_dir=None):
    from dpbp.comm import SerialComm
    from dpbp.train import Trainer

    return Trainer(cfg, SerialComm(), run_dir, echo=lambda text: None)


BOTH = ("data.train=spirals:n=300", "model.dropout=[0.3,0.1]", "model.batch_norm=true")


def test_resume_mid_epoch_is_bit_identical(tmp_path):
    from helpers import small_config

    from dpbp import checkpoint as ckpt

    cfg = small_config(*BOTH, "train.epochs=3", "checkpoint.every_steps=5", "checkpoint.keep=100")
    full = quiet_trainer(cfg, tmp_path / "run").run()
    middle = [p for p in ckpt.periodic_checkpoints(tmp_path / "run" / "checkpoints") if int(p.stem[5:]) % 16][2]
    resumed = quiet_trainer(cfg)
    resumed.restore(middle)
    assert resumed.state.step_in_epoch > 0 and resumed.model.running_var.any()
    out = resumed.run()
    np.testing.assert_array_equal(out.model.params, full.model.params)
    np.testing.assert_array_equal(out.model.running_mean, full.model.running_mean)
    np.testing.assert_array_equal(out.model.running_var, full.model.running_var)


def test_saved_model_keeps_the_running_statistics_for_predict_and_evaluate(tmp_path):
    from helpers import invoke, small_config

    from dpbp.checkpoint import load_model, load_network
    from dpbp.train import evaluate

    cfg = small_config(*BOTH)
    trainer = quiet_trainer(cfg, tmp_path / "run")
    result = trainer.run()
    assert not np.allclose(result.model.running_var, 1.0)  # training moved them
    net = load_network(tmp_path / "run" / "model.npz").model
    np.testing.assert_array_equal(net.running_mean, result.model.running_mean)
    np.testing.assert_array_equal(net.running_var, result.model.running_var)
    assert net.dropout == (0.3, 0.1) and net.batch_norm
    val = trainer.data.val
    np.testing.assert_array_equal(net.predict(val.x), result.model.predict(val.x))
    raw = np.random.default_rng(0).normal(size=(7, 2))
    folded = load_model(tmp_path / "run" / "model.npz")  # the input normaliser folded into layer 1
    expected = result.model.predict(trainer.data.normalizer.apply(raw, np.float64))
    assert rel(folded.predict(raw), expected) < 1e-12
    assert evaluate(net, val, trainer.comm, trainer.data.targets)["loss"] == result.reports["val"]["loss"]
    out = invoke("evaluate", "--model", tmp_path / "run" / "model.npz", "--data", "spirals:n=300", "--json")
    assert out.exit_code == 0, out.output
    unfitted = MLP(net.sizes, dtype="float64", dropout=0.3, batch_norm=True)  # running statistics 0 and 1
    unfitted.params[...] = net.params
    assert not np.allclose(unfitted.predict(val.x), net.predict(val.x))  # so they matter


def test_checkpoints_without_the_new_keys_still_load(tmp_path):
    """A checkpoint and a model file as the previous formats wrote them (no dropout, batch_norm, bn_*)."""
    from helpers import small_config

    from dpbp import checkpoint as ckpt

    cfg = small_config("train.epochs=1")
    trainer = quiet_trainer(cfg, tmp_path / "run")
    trainer.run()
    path = ckpt.periodic_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    arrays, meta = ckpt.load_checkpoint(path)
    for key in ("dropout", "batch_norm"):
        del meta["model"][key]
    meta["format_version"] = 3
    old = tmp_path / "old.npz"
    ckpt.atomic_write_npz(old, arrays, meta)
    resumed = quiet_trainer(cfg)
    resumed.restore(old)
    np.testing.assert_array_equal(resumed.model.params, trainer.model.params)
    model_meta = dict(ckpt.read_meta(tmp_path / "run" / "model.npz"), format_version=2)
    model_arrays, _ = ckpt.read_npz(tmp_path / "run" / "model.npz", "model", lambda m: ckpt._model_layout(m, ""))
    for key in ("dropout", "batch_norm"):
        del model_meta["model"][key]
    ckpt.atomic_write_npz(tmp_path / "old-model.npz", model_arrays, model_meta)
    np.testing.assert_array_equal(ckpt.load_network(tmp_path / "old-model.npz").model.params, trainer.model.params)
    bad = dict(model_meta, model={**model_meta["model"], "batch_norm": True})  # an old format cannot say so
    ckpt.atomic_write_npz(tmp_path / "bad.npz", model_arrays, bad)
    with pytest.raises(Exception, match="newer format version"):
        ckpt.load_network(tmp_path / "bad.npz")


def test_a_batch_of_one_row_is_refused_with_batch_norm():
    from helpers import small_config

    from dpbp.errors import ConfigError

    with pytest.raises(ConfigError, match="model.batch_norm: needs at least 2 rows in every batch"):
        quiet_trainer(small_config("model.batch_norm=true", "train.batch_size=10"))  # 271 rows: 27 x 10 + 1
    quiet_trainer(small_config("model.dropout=0.5", "train.batch_size=10"))  # dropout alone does not mind


def test_a_skipped_step_leaves_the_running_statistics():
    from helpers import small_config

    cfg = small_config(*BOTH, "train.on_nonfinite=skip", "train.epochs=1")
    t = quiet_trainer(cfg)
    real, calls = t.model.loss_and_grad_sum, []

    def poisoned(*args, **kwargs):
        stats = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            t.model.layer_views(t.exchange.grad)[0][0][0, 0] = np.nan
        return stats

    t.model.loss_and_grad_sum = poisoned
    seen = []
    t.run(on_step_end=lambda tr: seen.append(tr.model.running_var.copy()) and False)
    np.testing.assert_array_equal(seen[1], seen[2])  # step 3 was skipped: its batch statistics were not kept
    assert not np.array_equal(seen[2], seen[3])


def test_cli_train_says_what_the_hidden_layers_do(tmp_path):
    from helpers import invoke

    out = invoke("train", "--set", "data.train=spirals:n=300", "--set", "model.hidden=[8,8]", "--set",
                 "model.dropout=[0.3,0.1]", "--set", "model.batch_norm=true", "--epochs", "1", "--run-dir",
                 tmp_path / "run")
    assert out.exit_code == 0, out.output
    assert "hidden layers: dropout 0.3, 0.1; batch norm over the global batch" in out.output


def test_an_estimator_keeps_batch_norm_and_dropout():
    pytest.importorskip("sklearn")
    from dpbp import MLPClassifier

    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 3))
    y = (X[:, 0] + X[:, 1] > 0).astype(int)
    est = MLPClassifier((8,), max_iter=3, batch_size=16, random_state=0,
                        config={"model.batch_norm": True, "model.dropout": 0.2}).fit(X, y)
    assert est.model_.batch_norm and est.model_.dropout == (0.2,)
    assert not np.allclose(est.model_.running_var, 1.0)  # the trained running statistics, not fresh ones
    assert est.predict(X).shape == (120,)
