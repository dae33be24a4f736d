"""Who writes a video group: claims that hold across threads, processes and hosts, on any zarr store.

A claim is a small JSON object at ``<store>/claims/<video_id>/<claim id>.json`` (``CLAIMS_PREFIX``, outside
``videos/``, so deleting a group never deletes its claims), written and read through zarr's store API only (``set``,
``get``, ``delete``, ``list_prefix``). The same code therefore works on a local or shared file system
(``LocalStore``), object storage (``FsspecStore``: S3, MinIO, Ceph, GCS) and memory.

Protocol (``claim_video``): a writer writes its own claim under a new, unique key, then lists the video's claims.
It owns the video only if its claim is the only live one; otherwise it deletes its claim, waits a moment and looks
again, and raises ``VideoClaimedError`` naming the holder if a live claim is still there. At most one writer owns:
each writer writes before it lists, so of two writers the one that lists second sees the other's claim (if both
went ahead, each list would precede the other's write, a cycle in time). Two writers that see each other both back
off; the random pause makes one of them win the next round. This needs read-after-write and list-after-write
consistency: local file systems, Lustre/GPFS, S3 (since December 2020), GCS and Azure have it; an NFS client caches
directory listings (``acdirmin``/``acdirmax``), so several hosts on NFS need ``actimeo=0`` (or object storage).

Why not conditional writes: ``Store.set_if_not_exists`` is an exclusive hard link on ``LocalStore`` but an
exists-then-put on ``FsspecStore`` (not atomic), and S3's ``If-None-Match`` is not reachable through zarr and s3fs.
One lock key would also need a compare-and-delete to be taken over safely; unique keys need none.

Liveness (``is_live``): a claim is live until its ``expires`` time; its owner pushes that to ``now + ttl`` while it
writes (``Claim.refresh``: ``cache.writer.VideoWriter`` calls it on each appended batch, rewriting the same key).
Progress, not a heartbeat thread, keeps a claim alive, so a writer that hangs loses its claim too. Sooner than that:

- a claim of this machine (same hostname, boot id and pid namespace) whose process is gone (no such pid, a zombie,
  or a pid reused by a process started later) is dead at once;
- a claim of this process whose ``Claim`` object was released or garbage-collected is dead at once.

Another host's claim dies only at its expiry, which compares its writer's clock with ours: hosts need synchronised
clocks (NTP), which a ttl of minutes makes undemanding.

A dead claim is taken over by the next claimer that owns the video: it deletes the dead claims, then the video's
group if that is incomplete (a complete group is never deleted; a live claim's group is never touched). A writer
whose claim was taken over (it stalled longer than its ttl) finds its key gone at its next ``refresh`` and stops
with ``ClaimLostError``; the writer also checks before its completion marker that the group is still the one it
created (``cache.writer``). What a lease cannot exclude: a writer frozen for longer than its ttl in the middle of a
chunk write, which lands after the takeover; pick a ttl far above any pause between batches (default 10 minutes).
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import os
import random
import re
import secrets
import socket
import threading
import time
import weakref
from typing import Callable

from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from cache.schema import CLAIMS_PREFIX, COMPLETE_ATTR, WRITER_ATTR
from cache.store import CacheError, FeatureStore, check_video_id

DEFAULT_TTL = 600.0  # seconds a claim stays live without a refresh: the wait before another host's dead writer is redone
_CONTENDER_AGE = 2.0  # a live claim younger than this may be a contender about to back off: try again

log = logging.getLogger(__name__)


class VideoClaimedError(CacheError):
    """Another writer holds a live claim on the video (``holder``: its claim record)."""

    def __init__(self, message: str, holder: dict):
        super().__init__(message)
        self.holder = holder


class ClaimLostError(CacheError):
    """A writer's claim is gone: taken over after it stopped refreshing for longer than its ttl, or removed by hand."""


# -------------------------------------------------------------------------------------- this process and machine


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


@functools.lru_cache(maxsize=None)
def _machine() -> str:
    """Hostname, boot id and pid namespace: processes with the same value see each other's pids (on Linux; elsewhere
    the hostname alone decides)."""
    try:
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        ns = "-"
    return f"{socket.gethostname()}/{_read('/proc/sys/kernel/random/boot_id') or '-'}/{ns}"


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks after boot) of a process, from ``/proc/<pid>/stat``; None when unknown."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return None
    fields = stat.rpartition(")")[2].split()  # the command name (field 2) may hold spaces and parentheses
    try:
        return fields[0], int(fields[19])  # fields 3 and 22 of proc(5)
    except (IndexError, ValueError):
        return None


def _self_start() -> int | None:
    pid = os.getpid()  # per pid: a forked child is another process
    if pid not in _SELF_START:
        stat = _proc_stat(pid)
        _SELF_START[pid] = stat[1] if stat else None
    return _SELF_START[pid]


_SELF_START: dict[int, int | None] = {}


def _running(pid: int, start: int | None) -> bool:
    """Whether ``pid`` on this machine still runs the process that started at ``start`` (if known)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    stat = _proc_stat(pid)
    if stat is None:
        return True  # no /proc: trust the pid
    state, started = stat
    if state == "Z":
        return False  # killed, not yet reaped by its parent
    return start is None or started == start


_MINE: "weakref.WeakValueDictionary[str, Claim]" = weakref.WeakValueDictionary()  # this process's unreleased claims


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="milliseconds")


def utc_now() -> str:
    """Now, in the ISO form (UTC, milliseconds) of every time a claim or a group's ``writer`` records."""
    return _iso(time.time())


def _unix(text) -> float | None:
    try:
        return datetime.datetime.fromisoformat(str(text)).timestamp()
    except (TypeError, ValueError):
        return None


def is_live(record: dict, now: float | None = None) -> bool:
    """Whether a claim record (as stored) still holds its video: see the module's docstring."""
    expires = _unix(record.get("expires"))
    if expires is None:
        return False  # not a claim this code wrote
    if record.get("machine") == _machine():
        pid = record.get("pid")
        if not isinstance(pid, int):
            return False
        if pid == os.getpid() and record.get("proc_start") == _self_start():
            if record.get("claim") not in _MINE:
                return False  # its Claim was released or collected: its writer is gone
        elif not _running(pid, record.get("proc_start")):
            return False
    return (time.time() if now is None else now) < expires


# --------------------------------------------------------------------------------------------------- the store


def _prefix(video_id: str) -> str:
    return f"{CLAIMS_PREFIX}/{check_video_id(video_id)}"


def _put(store: FeatureStore, key: str, record: dict) -> None:
    data = json.dumps(record, sort_keys=True, indent=1).encode()
    sync(store.root.store.set(key, default_buffer_prototype().buffer.from_bytes(data)))


def _get(store: FeatureStore, key: str) -> dict | None:
    """The record at ``key``; None when absent, ``{}`` when it is not a JSON object (never live)."""
    buf = sync(store.root.store.get(key, prototype=default_buffer_prototype()))
    if buf is None:
        return None
    try:
        record = json.loads(buf.to_bytes())
    except (ValueError, UnicodeDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def _delete(store: FeatureStore, key: str) -> None:
    sync(store.root.store.delete(key))


def _keys(store: FeatureStore, prefix: str) -> list[str]:
    """Claim keys under ``prefix`` (a video's folder or all of ``claims``), without LocalStore's ``.partial`` temporaries."""

    async def _ls():
        return [k async for k in store.root.store.list_prefix(prefix)]

    try:
        keys = sync(_ls())
    except FileNotFoundError:
        return []
    return sorted(k for k in keys if k.startswith(prefix + "/") and k.endswith(".json"))


def _records(store: FeatureStore, prefix: str, skip: str | None = None) -> list[dict]:
    """The claim records under ``prefix``, each with its ``key`` added (those deleted since the listing left out)."""
    out = []
    for key in _keys(store, prefix):
        if key == skip:
            continue
        record = _get(store, key)
        if record is not None:
            out.append({**record, "key": key})
    return out


def describe(record: dict) -> str:
    """``worker W (host H, pid P) since T``: who holds a claim, for messages."""
    return (f"worker {record.get('worker')!r} (host {record.get('host')}, pid {record.get('pid')}) "
            f"since {record.get('created')}")


# ----------------------------------------------------------------------------------------------------- claims


class Claim:
    """One writer's ownership of one video group (from ``claim_video``): ``refresh()`` while writing, ``release()``
    when done (or use it as a context manager). ``replaced`` lists what taking the video over removed: dead claims
    (``{"claim": record}``) and a partial group (``{"partial": its writer attribute}``)."""

    def __init__(self, store: FeatureStore, video_id: str, record: dict, ttl: float):
        self.store = store
        self.video_id = video_id
        self.record = record
        self.ttl = float(ttl)
        self.key = f"{_prefix(video_id)}/{record['claim']}.json"
        self.replaced: list[dict] = []
        self.released = False
        self._refreshed = time.monotonic()
        self._lock = threading.Lock()  # refresh runs in extraction's writer thread, release in the caller's
        _MINE[self.id] = self

    @property
    def id(self) -> str:
        return self.record["claim"]

    @property
    def worker(self) -> str:
        return self.record["worker"]

    def __repr__(self) -> str:
        return f"Claim({self.store.url}, {self.video_id!r}, {self.id!r}{', released' if self.released else ''})"

    def _lost(self, why: str) -> ClaimLostError:
        return ClaimLostError(f"{self.store.url}: video {self.video_id!r}: this writer's claim {self.key} {why}; "
                              "another writer took the video over (this one stalled for longer than its ttl of "
                              f"{self.ttl:g} s?): its work is discarded")

    def refresh(self, *, min_interval: float = 0.0) -> None:
        """Check that the claim is still this writer's (``ClaimLostError`` if not), then push its expiry to now +
        ttl, unless it was pushed less than ``min_interval`` seconds ago (the check is done every time)."""
        with self._lock:
            if self.released:
                raise self._lost("was released")
            stored = _get(self.store, self.key)
            if not stored or stored.get("claim") != self.id:
                raise self._lost("is gone")
            if time.monotonic() - self._refreshed < min_interval:
                return
            now = time.time()
            if now >= (_unix(self.record["expires"]) or 0):
                # expired: a claimer may have seen it dead already; revive it only if nobody else claims the video
                others = [r for r in _records(self.store, _prefix(self.video_id), skip=self.key) if is_live(r, now)]
                if others:
                    raise self._lost(f"expired and {describe(others[0])} claims the video")
            self.record = {**self.record, "refreshed": _iso(now), "expires": _iso(now + self.ttl)}
            _put(self.store, self.key, self.record)
            self._refreshed = time.monotonic()

    def release(self) -> None:
        """Give the video up (idempotent); the group is left as it is."""
        with self._lock:
            if self.released:
                return
            self.released = True
            _MINE.pop(self.id, None)
            _delete(self.store, self.key)

    def delete_partial(self) -> bool:
        """Delete the video's group if it exists and is incomplete; only the owner calls this. True if deleted."""
        if self.released:
            raise self._lost("was released")
        attrs = self.store.video_attrs(self.video_id)
        if attrs is not None and COMPLETE_ATTR in attrs:
            return False
        # also when there is no readable group metadata: arrays a writer left before (or without) it
        self.store.delete_video(self.video_id)
        if attrs is None:
            return False
        self.replaced.append({"partial": attrs.get(WRITER_ATTR) or {}})
        return True

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def default_worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _new_record(video_id: str, worker: str, ttl: float) -> dict:
    now = time.time()
    host = socket.gethostname()
    stamp = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", host)[:40] or "host"
    return {
        "video_id": video_id,
        "claim": f"{stamp}-{slug}-{os.getpid()}-{secrets.token_hex(4)}",
        "worker": worker,
        "host": host,
        "pid": os.getpid(),
        "machine": _machine(),
        "proc_start": _self_start(),
        "ttl": float(ttl),
        "created": _iso(now),
        "refreshed": _iso(now),
        "expires": _iso(now + ttl),
    }


def claim_video(store: FeatureStore, video_id: str, *, ttl: float = DEFAULT_TTL, worker: str | None = None,
                attempts: int = 3) -> Claim:
    """Claim ``video_id`` of ``store`` for writing; ``VideoClaimedError`` (naming the holder) if another writer's
    claim is live. Dead claims are taken over: removed, and the video's incomplete group with them.

    ``ttl``: seconds the claim stays live without a ``refresh``. ``worker``: a label recorded in the claim and the
    group (default ``host:pid``). ``attempts``: rounds when the only other claims are contenders that back off too.
    """
    check_video_id(video_id)
    if not ttl > 0:
        raise ValueError(f"claim_video: ttl must be > 0 seconds, got {ttl!r}")
    worker = worker or default_worker()
    prefix = _prefix(video_id)
    holder = None
    for attempt in range(max(1, attempts)):
        claim = Claim(store, video_id, _new_record(video_id, worker, ttl), ttl)  # registered before it is visible
        _put(store, claim.key, claim.record)
        now = time.time()
        others = _records(store, prefix, skip=claim.key)
        live = [r for r in others if is_live(r, now)]
        if not live and _get(store, claim.key):
            for dead in others:
                _delete(store, dead["key"])
                claim.replaced.append({"claim": {k: v for k, v in dead.items() if k != "key"}})
                log.info("%s: video %r: took over the dead claim of %s", store.url, video_id, describe(dead))
            if others:
                claim.delete_partial()  # the dead claims first, so that a writer that wakes up finds its key gone
            return claim
        claim.release()
        holder = min(live, key=lambda r: str(r.get("created"))) if live else None
        if holder is not None and now - (_unix(holder.get("created")) or 0) > _CONTENDER_AGE:
            break  # an established writer, not a contender that backs off as well
        if attempt + 1 < attempts:
            time.sleep(random.uniform(0.05, 0.3))  # contenders pause for different times: one wins the next round
    holder = holder or {"worker": "a contending writer"}
    raise VideoClaimedError(
        f"{store.url}: video {video_id!r} is being written by {describe(holder)}; its claim {holder.get('key')} "
        f"is live until {holder.get('expires')} unless refreshed (remove it by hand only if that writer is gone)",
        holder,
    )


def wait_for_claim(store: FeatureStore, video_id: str, *, done: Callable[[], bool], ttl: float = DEFAULT_TTL,
                   worker: str | None = None, poll: float = 5.0, timeout: float | None = None) -> Claim | None:
    """Claim ``video_id``, waiting while another writer holds it; None as soon as ``done()`` is true (the holder
    finished the video). The wait lasts as long as the holder makes progress, or ``ttl`` after it stops; with a
    ``timeout`` (seconds), ``VideoClaimedError`` after that."""
    start = time.monotonic()
    announced = None
    while True:
        if done():
            return None
        try:
            claim = claim_video(store, video_id, ttl=ttl, worker=worker)
        except VideoClaimedError as e:
            if timeout is not None and time.monotonic() - start > timeout:
                raise
            if e.holder.get("claim") != announced:
                announced = e.holder.get("claim")
                log.info("%s: video %r: waiting for %s", store.url, video_id, describe(e.holder))
            time.sleep(poll * random.uniform(0.5, 1.5))
            continue
        if done():
            claim.release()
            return None
        return claim


def live_claim(store: FeatureStore, video_id: str) -> dict | None:
    """The live claim on ``video_id`` (the oldest, if contenders overlap), with its ``key``; None if nobody writes it."""
    live = [r for r in _records(store, _prefix(video_id)) if is_live(r)]
    return min(live, key=lambda r: str(r.get("created"))) if live else None


def list_claims(store: FeatureStore, video_id: str | None = None) -> list[dict]:
    """Every claim record of ``video_id`` (or of the whole store), with its ``key`` and ``live`` added: for tools."""
    prefix = _prefix(video_id) if video_id is not None else CLAIMS_PREFIX
    now = time.time()
    return [{**r, "live": is_live(r, now)} for r in _records(store, prefix)]
