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


class TrainingError(DpbpError):
    """Training cannot continue (non-finite numbers, ranks out of sync).

    Raised only from values every rank shares (reduced sums, gathered digests),
    so all ranks raise it together.
    """

    exit_code = 3
    collective = True


class AgreedError(DpbpError):
    """An error raised on one or more ranks and agreed on by all (see ``dpbp.comm.all_or_nothing``)."""

    collective = True

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class InputError(DpbpError, ValueError):
    """Bad data or parameters given to the Python API (the scikit-learn estimators).

    Also a ``ValueError``, as scikit-learn and its tools (``GridSearchCV``, the estimator
    checks) expect of an estimator that refuses its input.
    """


class MissingExtraError(DpbpError, ImportError):
    """An optional feature needs a package that is not installed; the message names the pip extra."""

    exit_code = 1
