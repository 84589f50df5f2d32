"""User-facing errors: one line saying what was wrong and what to do, exit code 2."""

from __future__ import annotations


class CapsctlError(Exception):
    """An error caused by the user's input (config, data, checkpoint, flags).

    The CLI prints ``str(err)`` as a single line and exits with ``exit_code``; the traceback is
    shown only when ``CAPSCTL_DEBUG=1``.
    """

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line


class ConfigError(CapsctlError):
    pass


class DataError(CapsctlError):
    pass


class CheckpointError(CapsctlError):
    pass


class TrainingError(CapsctlError):
    """Training stopped for a reason that is not a bug (non-finite loss, disk full)."""

    exit_code = 1
