"""docs/benchmarks.md is shared by every benchmark script: each owns one section between
``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` and replaces only that."""

from __future__ import annotations

import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def write_section(section: str, text: str, doc: Path = DOC) -> None:
    """Replace (or append) ``section`` of the benchmarks page, re-reading the file first; atomic."""
    begin, end = f"<!-- bench:{section} -->", f"<!-- /bench:{section} -->"
    old = doc.read_text() if doc.exists() else "# Benchmarks\n"
    block = f"{begin}\n{text.strip()}\n{end}"
    if begin in old and end in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    doc.parent.mkdir(exist_ok=True)
    tmp = doc.with_suffix(".md.tmp")
    tmp.write_text(new)
    tmp.replace(doc)


def command() -> str:
    """How the running benchmark was started, for its report: ``python benchmarks/<script> <arguments>``."""
    return " ".join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])


def publish(section: str, text: str, write: bool = True) -> None:
    """Print a benchmark's report and, unless ``write`` is False (``--no-write``), replace its section."""
    print(text)
    if write:
        write_section(section, text)
