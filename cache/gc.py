"""``stctx cache gc URL --older-than AGE [--yes]``: remove the incomplete video groups that dead writers left.

URL is one store, or a folder or prefix of ``<name>.zarr`` stores (as ``stctx cache ls``), a path or an fsspec URL
(``s3://bucket/prefix``). AGE is a number and a unit: ``90s``, ``30m``, ``2h``, ``7d``, ``2w``.

An incomplete video group (no completion marker: ``cache/schema.py``) is removed when all of these hold:

- no live claim is on its video (``cache.claims.live_claim``: a writer whose process runs, or whose lease has not
  expired, is at work on it, whatever its age);
- its last sign of life is older than AGE. That is the newest of: the group's ``writer.started`` and
  ``provenance.date`` attributes (``cache.writer``), the ``refreshed`` time of every (dead) claim of the video, and
  the modification time of every object under the group (a writer that started long ago but appended a batch a
  minute ago is a minute old). A group with none of these is kept: its age is unknown.

A complete group is never removed, nor even listed. Without ``--yes`` nothing is touched: each incomplete group is
printed with what would happen to it (``REMOVE``, or ``KEEP`` and why), its bytes and its last sign of life, then
what ``--yes`` would free. With ``--yes`` each group to remove is taken under a claim of the gc's own
(``cache.claims.claim_video``): no writer can start on the video meanwhile, and the dead claims go with the group.
A group whose video was claimed, completed or rewritten by another writer since the listing is kept.

Exit status 0; 1 when a store in the folder could not be read (its line says why); an AGE that is not one, or a URL
that holds no store, is one line and exit 2.
"""

from __future__ import annotations

import argparse
import datetime
import re
import time
from dataclasses import dataclass, field

from cache.claims import VideoClaimedError, claim_video, describe, list_claims
from cache.schema import COMPLETE_ATTR, VIDEOS_GROUP, WRITER_ATTR
from cache.store import CacheError, FeatureStore, StoreUnreachableError, store_errors
from cache.verify import format_bytes, store_urls
from pipeline.errors import InputError

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_AGE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhdw])\s*")
GC_WORKER = "stctx cache gc"
GC_TTL = 120.0  # seconds: the gc's own claim lives only while it deletes one group


def parse_age(text: str) -> float:
    """``"30m"`` -> 1800.0 seconds; ``InputError`` for anything else."""
    m = _AGE.fullmatch(str(text))
    if not m:
        raise InputError("--older-than", None, f"{text!r} is not an age: expected a number and a unit, one of "
                         f"{', '.join(UNITS)} (90s, 30m, 2h, 7d, 2w)")
    return float(m.group(1)) * UNITS[m.group(2)]


def age_text(seconds: float) -> str:
    """1.5 days -> ``"1.5d"``; under a minute in whole seconds."""
    for unit in ("d", "h", "m"):
        if seconds >= UNITS[unit]:
            return f"{seconds / UNITS[unit]:.1f}{unit}"
    return f"{max(seconds, 0):.0f}s"


def _unix(value) -> float | None:
    """Seconds since the epoch from what an fsspec listing or an attribute holds: a number, a datetime, ISO text."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, datetime.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=datetime.timezone.utc)).timestamp()
    if isinstance(value, str):
        try:
            return _unix(datetime.datetime.fromisoformat(value.replace("Z", "+00:00")))
        except ValueError:
            return None
    return None


def modified_time(info: dict) -> float | None:
    """An object's modification time from its fsspec listing entry (local files: ``mtime``; S3: ``LastModified``;
    GCS and others: ``updated``, ``mtime``, ``last_modified``)."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "modified", "created"):
        t = _unix(info.get(key))
        if t is not None:
            return t
    return None


def group_objects(store: FeatureStore, video_id: str) -> dict[str, dict]:
    """The objects (files) under the store's group of ``video_id``, as fsspec lists them: ``{path: info}``."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(store.url)
    folder = f"{path.rstrip('/')}/{VIDEOS_GROUP}/{video_id}"
    fs.invalidate_cache(folder)  # object stores' listings are cached per process
    try:
        return fs.find(folder, detail=True)
    except FileNotFoundError:
        return {}


@dataclass
class Candidate:
    """One incomplete video group and what the gc does with it."""

    video_id: str
    last_active: float | None  # seconds since the epoch; None when nothing tells
    bytes: int
    action: str  # "remove" or "keep"
    reason: str
    writer_claim: str | None = None  # the claim id its writer recorded: a rewrite since the plan has another


@dataclass
class GcReport:
    url: str
    older_than: float
    incomplete: list[Candidate] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    claims_removed: int = 0

    @property
    def to_remove(self) -> list[Candidate]:
        return [c for c in self.incomplete if c.action == "remove"]


def assess(store: FeatureStore, video_id: str, older_than: float, now: float | None = None) -> Candidate | None:
    """What the gc does with the group of ``video_id``: None for a complete (or absent) group, else a ``Candidate``."""
    now = time.time() if now is None else now
    attrs = store.video_attrs(video_id)
    if attrs is not None and COMPLETE_ATTR in attrs:
        return None
    objects = group_objects(store, video_id)
    if attrs is None and not objects:
        return None  # gone since the listing
    attrs = attrs or {}
    writer = attrs.get(WRITER_ATTR) or {}
    claims = list_claims(store, video_id)
    times = [_unix(writer.get("started")), _unix((attrs.get("provenance") or {}).get("date")),
             *(_unix(c.get("refreshed")) for c in claims), *(modified_time(info) for info in objects.values())]
    times = [t for t in times if t is not None]
    last = max(times) if times else None
    nbytes = sum(int(info.get("size") or 0) for info in objects.values())
    live = sorted((c for c in claims if c["live"]), key=lambda c: str(c.get("created")))
    if live:
        action, reason = "keep", f"live claim of {describe(live[0])}"
    elif last is None:
        action, reason = "keep", "age unknown: no times in its attributes, claims or objects"
    elif now - last < older_than:
        action, reason = "keep", f"last written {age_text(now - last)} ago, newer than {age_text(older_than)}"
    else:
        action, reason = "remove", f"last written {age_text(now - last)} ago, no live claim"
    return Candidate(video_id, last, nbytes, action, reason, writer.get("claim"))


def plan(store: FeatureStore, older_than: float, now: float | None = None) -> GcReport:
    """Every incomplete group of ``store`` with what ``collect`` does with it; nothing is changed."""
    report = GcReport(store.url, older_than)
    with store_errors(store.url):
        for vid, done in store.video_status().items():
            if not done and (c := assess(store, vid, older_than, now)) is not None:
                report.incomplete.append(c)
    return report


def _remove(store: FeatureStore, c: Candidate, report: GcReport) -> None:
    """Remove the group of ``c`` under a claim of the gc's own, unless another writer got to it since the plan."""
    try:
        claim = claim_video(store, c.video_id, ttl=GC_TTL, worker=GC_WORKER)
    except VideoClaimedError as e:
        c.action, c.reason = "keep", f"claimed since the listing by {describe(e.holder)}"
        return
    with claim:  # taking dead claims over may already have deleted the group (claim.replaced says so)
        attrs = store.video_attrs(c.video_id)
        if attrs is not None and COMPLETE_ATTR in attrs:
            c.action, c.reason = "keep", "completed since the listing"
        elif attrs is not None and (attrs.get(WRITER_ATTR) or {}).get("claim") != c.writer_claim:
            c.action, c.reason = "keep", "rewritten by another writer since the listing"
        else:
            claim.delete_partial()  # never a complete group
            report.removed.append(c.video_id)
        report.claims_removed += sum("claim" in r for r in claim.replaced)


def collect(url: str, older_than: float, *, remove: bool = False, now: float | None = None
            ) -> list[GcReport | CacheError]:
    """``plan`` each store of ``url`` (``cache.verify.store_urls``) and, with ``remove``, remove its groups marked
    ``remove``. One report per store; a store of the folder that cannot be opened is its ``CacheError`` instead (the
    store at ``url`` itself, or a server that does not answer, raises). ``now`` (seconds since the epoch) is the
    time that ages are measured from; whether a claim is live is always decided at the real time."""
    out: list[GcReport | CacheError] = []
    for child in store_urls(url):
        try:
            store = FeatureStore.open(child, mode="r+" if remove else "r")
        except StoreUnreachableError:
            raise
        except CacheError as e:
            if child == url:
                raise
            out.append(e)
            continue
        report = plan(store, older_than, now)
        if remove:
            with store_errors(store.url):
                for c in report.to_remove:
                    _remove(store, c, report)
        out.append(report)
    return out


def format_report(report: GcReport, remove: bool) -> str:
    lines = [f"{report.url}: {len(report.incomplete)} incomplete video groups, {len(report.to_remove)} to remove "
             f"(older than {age_text(report.older_than)}, no live claim)"]
    width = max((len(c.video_id) for c in report.incomplete), default=0)
    for c in report.incomplete:
        when = "-" if c.last_active is None else datetime.datetime.fromtimestamp(
            c.last_active, datetime.timezone.utc).isoformat(timespec="seconds")
        verb = ("REMOVED" if c.video_id in report.removed else "REMOVE") if c.action == "remove" else "KEEP"
        lines.append(f"  {verb:<7}  {c.video_id:<{width}}  {format_bytes(c.bytes):>10}  {when}  {c.reason}")
    freed = sum(c.bytes for c in report.incomplete if c.video_id in report.removed)
    if remove:
        lines.append(f"removed {len(report.removed)} groups ({format_bytes(freed)}) and {report.claims_removed} "
                     "dead claims")
    elif report.to_remove:
        lines.append(f"dry run, nothing removed: --yes removes {len(report.to_remove)} groups "
                     f"({format_bytes(sum(c.bytes for c in report.to_remove))})")
    return "\n".join(lines)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", help="a store, or a folder or prefix of <name>.zarr stores (path or fsspec URL)")
    parser.add_argument("--older-than", required=True, metavar="AGE",
                        help="remove incomplete groups whose last write is older than AGE (90s, 30m, 2h, 7d, 2w)")
    parser.add_argument("--yes", action="store_true", help="remove them (default: a dry run that lists them)")


def run_cli(args: argparse.Namespace) -> int:
    """Print the plan (or what was removed) per store. Bad input raises (one line from ``stctx``, exit 2)."""
    older_than = parse_age(args.older_than)
    results = collect(args.url, older_than, remove=args.yes)
    if not results:
        print(f"{args.url}: no stores (no <name>.zarr feature store in this folder or prefix)")
    for r in results:
        print(f"error: {r}" if isinstance(r, CacheError) else format_report(r, args.yes))
    return 1 if any(isinstance(r, CacheError) for r in results) else 0
