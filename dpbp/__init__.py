"""dpbp: data-parallel backpropagation for multilayer perceptrons over MPI.

``MLP``, ``load_model``, the scikit-learn estimators ``MLPClassifier`` and ``MLPRegressor``
(the ``sklearn`` extra) and ``export_onnx`` (the ``onnx`` extra) are imported on first use, so
that ``dpbp train`` can install its signal handlers before NumPy loads (see ``dpbp.cli.entry``)
and the optional packages are needed only by what uses them.
"""

__version__ = "0.1.0"

# What ``from dpbp import *`` takes: the core only (the estimators and export_onnx need their extras).
__all__ = ["MLP", "load_model", "__version__"]
_LAZY = ("MLP", "MLPClassifier", "MLPRegressor", "export_onnx", "load_model")


def __dir__():
    return sorted([*globals(), *_LAZY])


def __getattr__(name: str):
    if name == "MLP":
        from dpbp.model import MLP

        return MLP
    if name == "load_model":
        from dpbp.checkpoint import load_model

        return load_model
    if name in ("MLPClassifier", "MLPRegressor"):
        from dpbp import estimators

        return getattr(estimators, name)
    if name == "export_onnx":
        from dpbp.onnx_export import export_onnx

        return export_onnx
    raise AttributeError(f"module 'dpbp' has no attribute {name!r}")
