"""dpbp: data-parallel backpropagation for multilayer perceptrons over MPI."""

from dpbp.model import MLP

__version__ = "0.1.0"

__all__ = ["MLP", "__version__"]
