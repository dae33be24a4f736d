"""The ``stctx`` command: utilities around the pipeline (the pipeline itself runs through Luigi tasks).

Each subcommand lives in the module that does the work, as a pair ``configure_parser(parser)`` /
``run_cli(args) -> exit code``; this file only wires them up. Bad input, an output that cannot be written and a
feature store that does not fit end in one clear line (``stctx CMD: error: file:line: what was expected``, exit 2),
not a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pipeline.errors import InputError
from pipeline.outputs import OutputError

# (command path, module, help); modules import lazily so `stctx --help` stays fast.
COMMANDS: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("ava", "check"), "pipeline.ava.check", "validate an AVA v2.2 folder before any GPU time is spent"),
    (("ava", "frames"), "pipeline.ava.frames", "decode AVA movies into the frames layout (30 fps, seconds 900-1800)"),
    (("mini-ava",), "pipeline.mini.cli", "generate the mini-AVA test bed in the AVA folder layout"),
    (("backbone", "info"), "pipeline.features.checkpoints", "show a SlowFast checkpoint's format, sha256 and config"),
    (("backbone", "finetune"), "pipeline.training.finetune", "train a SlowFast end to end with the baseline head on an AVA folder"),
    (("predict",), "pipeline.predict.run", "a trained model's action predictions on a video, frames folder or split, "
                                           "as an AVA CSV, an annotated video and a contact sheet"),
    (("eval",), "pipeline.ava.evaluation", "frame-mAP@0.5 of detections against ground truth (official AVA protocol)"),
    (("cache", "ls"), "cache.verify", "list the feature stores at a URL with their provenance, videos, bytes and splits"),
    (("cache", "info"), "cache.verify", "summarise a feature cache store"),
    (("cache", "verify"), "cache.verify", "check a feature cache store with Dask: completeness, shapes, NaN/Inf, checksums"),
    (("cache", "stats"), "cache.stats", "per-channel mean/std, sparsity and bytes per keyframe of a store's features (Dask)"),
    (("cache", "export-h5"), "cache.export", "export a store (or one split) to one HDF5 file, one group per video"),
    (("cache", "gc"), "cache.gc", "remove incomplete video groups older than an age (a dry run unless --yes)"),
)

GROUPS = {"ava": "AVA dataset utilities", "backbone": "SlowFast backbone utilities",
          "cache": "feature cache utilities"}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stctx", description=__doc__.splitlines()[0])
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    wanted = [a for a in (argv or []) if not a.startswith("-")][:2]
    for path, module, help_text in COMMANDS:
        if len(path) == 2:
            if path[0] not in groups:
                group = top.add_parser(path[0], help=GROUPS[path[0]], description=GROUPS[path[0]])
                groups[path[0]] = group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
            sub = groups[path[0]].add_parser(path[1], help=help_text, description=help_text)
        else:
            sub = top.add_parser(path[0], help=help_text, description=help_text)
        sub.set_defaults(_module=module, _name=" ".join(path))
        if list(path) == wanted[: len(path)]:  # configure only the chosen command: imports stay lazy
            _load(module).configure_parser(sub)
    return parser


def _load(module: str):
    return importlib.import_module(module)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return int(_load(args._module).run_cli(args) or 0)
    except _user_errors() as err:
        print(f"stctx {args._name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stctx {args._name}: interrupted", file=sys.stderr)
        return 130


def _user_errors() -> tuple[type[Exception], ...]:
    """The errors that are the user's to fix: bad input, an unwritable output, a feature store that does not fit.

    ``cache.store`` (zarr) is imported by the commands that use it; a ``CacheError`` can only come once it is loaded,
    so it is looked up, not imported, to keep ``stctx --help`` fast."""
    store = sys.modules.get("cache.store")
    return (InputError, OutputError) + ((store.CacheError,) if store is not None else ())


if __name__ == "__main__":
    sys.exit(main())
