"""Errors for bad input: every message names the file, the line and what was expected."""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """A file (or a row of it) does not have the expected format.

    ``str(err)`` is ``"<path>:<line>: <message>"`` (or ``"<path>: <message>"`` when no line applies),
    the form editors and terminals turn into a link.
    """

    def __init__(self, path: str | Path | None, line: int | None, message: str):
        self.path = None if path is None else str(path)
        self.line = line
        self.message = message
        where = self.path or "<input>"
        if line is not None:
            where = f"{where}:{line}"
        super().__init__(f"{where}: {message}")
