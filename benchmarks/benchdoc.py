"""docs/benchmarks.md is shared by every benchmark script: each owns one section between
``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` and replaces only that."""

from __future__ import annotations

import platform
import subprocess
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


def cpu_model(isa: bool = False) -> str:
    """``lscpu``'s model name (the machine's CPU, for a report), else the platform's processor string; with ``isa``
    followed by the vector extension torch's kernels get here, "(AVX-512)" or "(AVX2)" (the two CPU kinds of this
    project's machines differ 3x in conv3d training)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or platform.platform()
    names = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")]
    name = names[0] if names else platform.platform()
    if not isa:
        return name
    flags = next((line for line in out.splitlines() if line.startswith("Flags")), "")
    return f"{name} ({'AVX-512' if 'avx512f' in flags else 'AVX2' if 'avx2' in flags else 'no AVX2'})"


def command() -> str:
    """How the running benchmark was started, for its report: ``python benchmarks/<script> <arguments>``."""
    return " ".join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])


def publish(section: str, text: str, write: bool = True) -> None:
    """Print a benchmark's report and, unless ``write`` is False (``--no-write``), replace its section."""
    print(text)
    if write:
        write_section(section, text)
