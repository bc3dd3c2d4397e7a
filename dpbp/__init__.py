"""dpbp: data-parallel backpropagation for multilayer perceptrons over MPI."""

__version__ = "0.1.0"

from dpbp.checkpoint import load_model  # noqa: E402 - after __version__, which checkpoint reads
from dpbp.model import MLP  # noqa: E402

__all__ = ["MLP", "load_model", "__version__"]
