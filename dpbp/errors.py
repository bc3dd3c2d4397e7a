"""Errors a user can act on.

Every expected mistake (bad config, bad data, bad checkpoint) raises a subclass of
:class:`DpbpError`; the CLI prints its message once and exits with ``exit_code``
without a traceback. Anything else is a bug or an environment failure and is
reported with the failing rank.
"""

from __future__ import annotations


class DpbpError(Exception):
    """Base class for errors whose message alone tells the user what to fix."""

    exit_code = 2


class ConfigError(DpbpError):
    """A config key has a wrong type, an impossible value, or is unknown.

    ``key`` is the dotted name (``train.lr``) so the message can point at it.
    """

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config {key}: {message}" if key else f"config: {message}")


class DataError(DpbpError):
    """A data set is missing, unreadable, malformed, or does not fit the model."""


class CheckpointError(DpbpError):
    """A checkpoint or model file is missing, corrupt, or belongs to another model."""


class SaveError(DpbpError):
    """A file could not be written (full disk, read-only or missing folder)."""

    exit_code = 1


class InputError(DpbpError, ValueError):
    """Bad data or parameters given to the Python API (the scikit-learn estimators).

    Also a ``ValueError``, as scikit-learn and its tools (``GridSearchCV``, the estimator
    checks) expect of an estimator that refuses its input.
    """


class MissingExtraError(DpbpError, ImportError):
    """An optional feature needs a package that is not installed; the message names the pip extra."""

    exit_code = 1
