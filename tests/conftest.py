"""Shared test set-up.

Tests under tests/mpi/ need several ranks: they run only under
``mpirun -n K python -m pytest --with-mpi tests/mpi`` (tests/test_mpi_runs.py
launches exactly that at K = 2, 3, 4), so a plain ``pytest`` neither collects nor
skips them.
"""

from __future__ import annotations

import os
import sys

# scikit-learn's check_array_api_input runs only with this set (before SciPy is imported); without
# it the check is skipped, and the estimator checks must all run (tests/test_estimators.py).
os.environ.setdefault("SCIPY_ARRAY_API", "1")


def pytest_ignore_collect(collection_path, config):
    if "--with-mpi" in sys.argv or getattr(config.option, "with_mpi", False):
        return None
    if collection_path.name == "mpi" and collection_path.parent.name == "tests":
        return True
    return None
