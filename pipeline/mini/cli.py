"""``stctx mini-ava OUT``: generate the mini-AVA, optionally with a contact sheet of its keyframes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.ava import files as ava
from pipeline.mini.contact_sheet import contact_sheet
from pipeline.mini.generator import MiniAvaConfig, generate_mini_ava


def _count(text: str) -> int:
    """An argparse type for counts: 0 or less is an error, not the default size."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="folder to create (left alone if already complete with these arguments)")
    parser.add_argument("--videos", type=_count, default=None, help="number of videos, a fifth of them val and a fifth test (default 80; --tiny 4)")
    parser.add_argument("--seconds", type=_count, default=None, help="seconds per video, keyframes every 3 s (default 75; --tiny 10)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default 0)")
    parser.add_argument("--tiny", action="store_true", help="a dataset made in seconds, for tests (half-size frames)")
    parser.add_argument("--workers", type=_count, default=None, help="rendering processes (no effect on the result)")
    parser.add_argument("--contact-sheet", type=Path, default=None, metavar="PNG",
                        help="also draw a few val keyframes with their boxes and labels into this PNG")


def run_cli(args) -> int:
    try:
        config = MiniAvaConfig.make(args.videos, args.seconds, args.seed, args.tiny)
    except ValueError as err:
        print(f"stctx mini-ava: error: {err}", file=sys.stderr)
        return 2
    out = generate_mini_ava(args.out, config.videos, config.seconds, config.seed, config.tiny, args.workers)
    n = {s: len(ava.read_groundtruth(ava.AvaPaths(out).groundtruth(s)).frame().groupby(["video_id", "timestamp"]))
         for s in ava.SPLITS}
    print(f"{out}: {config.videos} videos x {config.seconds} s, "
          f"{n['train']} train / {n['val']} val / {n['test']} test keyframes")
    if args.contact_sheet is not None:
        contact_sheet(out, args.contact_sheet)
        print(f"contact sheet: {args.contact_sheet}")
    return 0
