"""User-facing errors: what was wrong, where, and how to fix it (exit code 2)."""

from __future__ import annotations


class AlambicError(Exception):
    """An error caused by the user's input; the CLI prints it and exits with 2."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  fix: {self.hint}"


class ConfigError(AlambicError):
    """The YAML config or a key=value override is invalid."""


class DataError(AlambicError):
    """A dataset file is missing, malformed, empty, or lacks a column."""


class ModelError(AlambicError):
    """A model or tokenizer cannot be loaded or does not fit the run."""
