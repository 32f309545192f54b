"""User-facing errors: the CLI prints these as one line, without a traceback."""

from __future__ import annotations


class DDBenchError(Exception):
    """Base for errors caused by the user's input (suite files, names, data), not by a bug."""


class UnknownNameError(DDBenchError, KeyError):
    """A name that is not in a registry (method, dataset, model)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ConfigError(DDBenchError, ValueError):
    """A suite or method configuration value that is invalid; the message names field and value."""


class DataMissingError(DDBenchError, FileNotFoundError):
    """A dataset is not on disk and may not be downloaded; the message says how to get it."""
