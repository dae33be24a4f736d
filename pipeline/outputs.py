"""Writing outputs: whole or not at all, errors that name the path, and no temporaries left by a dead run.

- ``atomic_file(path)``: a file object onto a temporary in ``path``'s folder, renamed over ``path`` only when the
  ``with`` block ends without an error; a failed write (a full disk, a torch serialisation error) removes the
  temporary and raises ``OutputError`` naming ``path``. ``write_text`` and ``write_json`` use it.
- ``temporary_dir(out)``: a new sibling folder ``<out>.tmp-<host>-<pid>-<random>`` to build ``out`` in and rename.
  It first removes the siblings of earlier runs on this host whose process is gone (``remove_dead_temporaries``),
  so a killed run's 0.5 GB half-written folder does not stay behind under a new name every time.
- ``built_dir(out)``: a ``temporary_dir`` that replaces ``out`` when its ``with`` block succeeds, removed if not.
- ``check_writable(folder)``: fails at once, before hours of work, when ``folder`` cannot be created or written.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


class OutputError(OSError):
    """An output could not be written; ``str(err)`` is ``"cannot write <path>: <reason>"``."""

    def __init__(self, path: str | Path, reason: str | BaseException, code: int | None = None):
        if isinstance(reason, OSError):
            code = reason.errno if code is None else code
            reason = reason.strerror or str(reason)
        super().__init__(code or errno.EIO, f"cannot write {path}: {reason}")
        self.path = str(path)

    def __str__(self) -> str:
        return self.strerror


@contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """``with atomic_file(p) as f: ...``: ``p`` holds the new content only once the block has finished."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise OutputError(path, err) from None
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; outputs are not
        os.replace(tmp, path)
    except OutputError:
        Path(tmp).unlink(missing_ok=True)
        raise
    except (OSError, RuntimeError) as err:  # RuntimeError: torch's writer reports a failed write so
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(path, err) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> Path:
    with atomic_file(path, "w") as f:
        f.write(text)
    return Path(path)


def write_json(path: str | Path, obj, **kwargs) -> Path:
    kwargs.setdefault("indent", 1)
    return write_text(path, json.dumps(obj, **kwargs) + "\n")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_HOST = socket.gethostname().replace("-", "_")


def temporary_dir(out: str | Path) -> Path:
    """A fresh sibling folder of ``out`` for building it; rename it to ``out`` when complete."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_temporaries(out)
        tmp = out.with_name(f"{out.name}.tmp-{_HOST}-{os.getpid()}-{secrets.token_hex(3)}")
        tmp.mkdir(mode=0o777)
    except OSError as err:
        raise OutputError(out, err) from None
    return tmp


@contextmanager
def built_dir(out: str | Path) -> Iterator[Path]:
    """``with built_dir(out) as work: ...``: build ``out`` in a ``temporary_dir`` that replaces it when the block
    ends without an error and is removed when it raises. A previous ``out`` is first renamed onto a temporary of this
    run, so a crash in between leaves a temporary the next run removes, never a half-replaced ``out``."""
    out = Path(out)
    work = temporary_dir(out)
    try:
        yield work
        if out.exists():
            old = temporary_dir(out)
            out.rename(old)  # onto the empty folder temporary_dir made
            work.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            work.rename(out)
    except BaseException as err:
        shutil.rmtree(work, ignore_errors=True)
        if isinstance(err, OSError) and not isinstance(err, OutputError):
            raise OutputError(out, err) from None
        raise


def remove_dead_temporaries(out: str | Path) -> list[Path]:
    """Remove ``temporary_dir(out)`` folders of processes on this host that no longer run; returns them.

    Folders of other hosts (a shared file system) and of live processes are left alone.
    """
    out = Path(out)
    removed = []
    for tmp in out.parent.glob(f"{out.name}.tmp-*"):
        host, _, rest = tmp.name[len(out.name) + len(".tmp-"):].partition("-")
        pid = rest.partition("-")[0]
        if host == _HOST and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def check_writable(folder: str | Path) -> Path:
    """Create ``folder`` if needed and prove a file can be written in it; ``OutputError`` naming it otherwise."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        raise OutputError(folder, err) from None
    return folder
