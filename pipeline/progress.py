"""Progress bars that read the same in a terminal and in a log file.

In a terminal ``progress`` is a plain tqdm bar, redrawn in place. Off a terminal (a Luigi worker's log, a batch job's
stderr file) tqdm's ``\\r`` redraws would pile up as one endless line, or as thousands when something turns them into
line ends; there the bar writes one plain line at most every ``interval`` seconds, and a last one with the final count.
"""

from __future__ import annotations

import sys
from typing import IO, Iterable

from tqdm import tqdm

LOG_INTERVAL = 30.0  # seconds between two lines of a bar in a log


class _Lines:
    """A text stream for tqdm off a terminal: every redraw becomes one line, the blank ones (clears) are dropped."""

    def __init__(self, stream: IO[str]):
        self.stream = stream

    def write(self, text: str) -> None:
        for line in text.replace("\r", "\n").split("\n"):
            if line.strip():
                self.stream.write(line.rstrip() + "\n")

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress(iterable: Iterable | None = None, *, total: float | None = None, desc: str | None = None,
             unit: str = "it", file: IO[str] | None = None, interval: float = LOG_INTERVAL, **kwargs) -> tqdm:
    """A tqdm bar over ``iterable`` (or updated by hand up to ``total``) on ``file`` (default: stderr).

    ``kwargs`` go to tqdm (``disable``, ``leave``, ``mininterval`` in a terminal, ...). Off a terminal the bar refreshes
    at most every ``interval`` seconds, always ends with a line of its final count (``leave`` is forced on) and is
    drawn in ASCII. ``set_postfix`` should be called with ``refresh=False``: a forced refresh prints a line.
    """
    stream = sys.stderr if file is None else file
    if not _is_terminal(stream):
        kwargs.update(file=_Lines(stream), mininterval=interval, maxinterval=interval, leave=True, ascii=True,
                      dynamic_ncols=False)
    else:
        kwargs["file"] = stream
    return tqdm(iterable, total=total, desc=desc, unit=unit, **kwargs)
