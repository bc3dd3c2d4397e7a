"""dpbp: data-parallel backpropagation for multilayer perceptrons over MPI.

``MLP`` and ``load_model`` are imported on first use, so that ``dpbp train`` can install its
signal handlers before NumPy loads (see ``dpbp.cli.entry``).
"""

__version__ = "0.1.0"

__all__ = ["MLP", "load_model", "__version__"]


def __getattr__(name: str):
    if name == "MLP":
        from dpbp.model import MLP

        return MLP
    if name == "load_model":
        from dpbp.checkpoint import load_model

        return load_model
    raise AttributeError(f"module 'dpbp' has no attribute {name!r}")
