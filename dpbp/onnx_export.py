"""ONNX export of a trained network: a standard graph any ONNX runtime can serve (``dpbp export``).

The graph takes RAW features ``input`` ``(N, n_features)`` in the model's dtype (float32 or
float64): the saved input normalisation is folded into the first layer's weights and a
regression's target scaling into the last layer's (``dpbp.checkpoint.fold_input_map`` /
``fold_output_map``, computed in float64), so nothing but the graph is needed to serve it.
Each layer is one ``Gemm`` (``x @ W.T + b``) and its activation (``Relu``, ``LeakyRelu``
alpha 0.01, ``Sigmoid``, ``Tanh``, none for identity; ``Softmax`` over axis 1 at a softmax
output). Outputs:

* classification: ``probabilities`` ``(N, classes)`` and ``label`` ``(N,)``: the class label
  as in training (a string tensor for text labels, int64 or double for numbers);
* binary: ``probabilities`` ``(N, outputs)`` (sigmoid);
* regression: ``predictions`` ``(N, targets)`` in the targets' own units.

Built with the ``onnx`` package (the ``onnx`` extra), opset 17, IR version 8, checked by
``onnx.checker`` before it is written. Batch normalization (evaluation form: the running
statistics) folds into its layer's ``Gemm`` as well (``fold_batch_norm``); dropout is off in
evaluation and leaves no trace.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from dpbp import __version__
from dpbp.checkpoint import Network, atomic_replace, fold_maps, load_network
from dpbp.errors import DataError, MissingExtraError, SaveError
from dpbp.ops import LEAKY_SLOPE

OPSET = 17
IR_VERSION = 8  # what opset 17 needs; read by every onnxruntime since 1.13
HIDDEN_OPS = {"relu": "Relu", "leaky_relu": "LeakyRelu", "sigmoid": "Sigmoid", "tanh": "Tanh", "identity": None}
OUTPUT_OPS = {"softmax": "Softmax", "sigmoid": "Sigmoid", "identity": None}


def _onnx():
    try:
        import onnx
    except ImportError as exc:
        raise MissingExtraError(f"ONNX export needs the onnx package ({exc}): pip install 'dpbp[onnx]'") from None
    return onnx


def _network(source) -> Network:
    """``source``: a model file or checkpoint path, or a fitted dpbp estimator."""
    if isinstance(source, (str, os.PathLike)):
        return load_network(source)
    network = getattr(source, "_network", None)
    if network is None:
        raise TypeError(f"expected a model file path or a fitted dpbp estimator, got {type(source).__name__}")
    return network()


def build_graph(network: Network, name: str = "dpbp_mlp"):
    """The ``onnx.ModelProto`` of ``network`` (see the module docstring). Reads ``network``; changes nothing."""
    onnx = _onnx()
    from onnx import TensorProto, helper, numpy_helper

    model, targets = network.model, network.targets
    params = model.params.copy()  # folded copies: the network itself is left as it is
    fold_maps(network, params)
    fold_batch_norm(model, params)
    W, b = model.layer_views(params)
    elem = TensorProto.FLOAT if model.dtype == np.float32 else TensorProto.DOUBLE
    nodes, init = [], []
    a = "input"
    last = model.n_layers - 1
    for layer in range(model.n_layers):
        init += [numpy_helper.from_array(np.ascontiguousarray(W[layer]), f"W{layer + 1}"),
                 numpy_helper.from_array(np.ascontiguousarray(b[layer]), f"b{layer + 1}")]
        z = f"z{layer + 1}"
        nodes.append(helper.make_node("Gemm", [a, f"W{layer + 1}", f"b{layer + 1}"], [z], transB=1))
        op = OUTPUT_OPS[model.output] if layer == last else HIDDEN_OPS[model.activation]
        a = z
        if op is not None:
            a = f"a{layer + 1}"
            extra = {"alpha": LEAKY_SLOPE} if op == "LeakyRelu" else {"axis": 1} if op == "Softmax" else {}
            nodes.append(helper.make_node(op, [z], [a], **extra))
    k = model.sizes[-1]
    out_name = {"classification": "probabilities", "binary": "probabilities"}.get(model.task, "predictions")
    nodes.append(helper.make_node("Identity", [a], [out_name]))
    outputs = [helper.make_tensor_value_info(out_name, elem, ["N", k])]
    if model.task == "classification":
        labels = targets.classes if targets.classes is not None else list(range(k))
        if isinstance(labels[0], str):
            table, label_type = np.array(labels, dtype=object), TensorProto.STRING
        elif all(isinstance(c, int) for c in labels):
            table, label_type = np.array(labels, dtype=np.int64), TensorProto.INT64
        else:
            table, label_type = np.array(labels, dtype=np.float64), TensorProto.DOUBLE
        init.append(numpy_helper.from_array(table, "classes"))
        nodes += [helper.make_node("ArgMax", [out_name], ["class_index"], axis=1, keepdims=0),
                  helper.make_node("Gather", ["classes", "class_index"], ["label"], axis=0)]
        outputs.append(helper.make_tensor_value_info("label", label_type, ["N"]))
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("input", elem, ["N", model.sizes[0]])],
                              outputs, init)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="dpbp",
                              producer_version=__version__, doc_string=f"dpbp MLP {list(model.sizes)}: "
                              f"{model.activation} hidden layers, {model.output} output, {model.task}; takes raw "
                              "features (the input normalisation is folded in)")
    proto.ir_version = IR_VERSION
    meta = {"task": model.task, "sizes": json.dumps(list(model.sizes)), "activation": model.activation,
            "output": model.output, "targets": json.dumps(targets.to_meta())}
    helper.set_model_props(proto, meta)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def fold_batch_norm(model, params: np.ndarray) -> None:
    """Fold each hidden layer's batch norm, as evaluation applies it, into that layer's W and b of ``params``.

    ``params``: a flat ``(n_params,)`` vector in ``model``'s layout and dtype, changed in place.
    With ``s = gamma / sqrt(running_var + eps)``: ``W' = s W`` (per output row) and
    ``b' = s (b - running_mean) + beta``, in float64, stored in the model dtype; the layer is then
    a plain ``x @ W'.T + b'``. Nothing happens without batch norm.
    """
    from dpbp.model import BN_EPS

    W, b = model.layer_views(params)
    gammas, betas = model.norm_views(params)
    for l, (mean, var) in enumerate(zip(*model.running_views())):
        s = gammas[l].astype(np.float64) / np.sqrt(var + BN_EPS)
        b[l][...] = s * (b[l].astype(np.float64) - mean) + betas[l]
        W[l][...] = W[l].astype(np.float64) * s[:, None]


def export_onnx(source, output: str | os.PathLike) -> Path:
    """Write the ONNX graph of ``source`` to ``output``: a ``model.npz`` or checkpoint path, or a fitted estimator.

    ``output`` must end in ``.onnx``; it is written atomically (a complete file or none); an
    estimator fitted under mpirun writes it on rank 0 alone (every rank returns the path).
    Returns its path. Raises MissingExtraError (no onnx package), CheckpointError (an unusable
    model file), DataError (bad output name or folder), SaveError (cannot write).

    The graph takes the model's dtype. In float32 the folded input normalisation cannot keep
    features with a large offset apart (a Unix time: 1.7e9 + seconds), which float32 inputs
    cannot hold either: export a float64 model (``dtype="float64"``) for such data.
    """
    out = Path(output)
    if hasattr(source, "_network"):  # a fitted estimator: under mpirun, rank 0 writes (as its save does)
        from dpbp.estimators import _communicator

        if not _communicator(source.comm).is_root:  # DP: one writer
            return out
    if out.suffix != ".onnx":
        raise DataError(f"cannot write {out}: use a .onnx file name")
    if not out.parent.is_dir():
        raise DataError(f"cannot write {out}: folder {out.parent} does not exist")
    data = build_graph(_network(source)).SerializeToString()
    try:
        atomic_replace(out, lambda fh: fh.write(data))
    except OSError as exc:
        raise SaveError(f"could not write {out}: {exc.strerror or exc}") from None
    return out
