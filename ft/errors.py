"""User-facing errors: the CLI prints them as one clear message and exits non-zero, never with a traceback."""

from __future__ import annotations


class FtError(Exception):
    """An error in the user's input (recipe, data, model path) or environment, with a ready-to-print message."""

    exit_code = 2


class RecipeError(FtError):
    """A recipe file or command-line override is invalid."""


class DataError(FtError):
    """One or more dataset rows are invalid; the message lists every bad row."""


class ModelError(FtError):
    """The model named by the recipe cannot be found or is not a Gemma 4 unified checkpoint."""
