"""Fast row reads from the cache's sharded arrays on a local disk, bypassing zarr's async read path.

Why: for a shard-aligned block of keyframes at r50 size, zarr 3 spends most of its time in per-chunk
machinery, not in I/O: an uncompressed float16 store read through zarr costs about 1.8 CPU ms per
keyframe, while the same bytes come out of the page cache in about 0.2 ms (``benchmarks/bench_cache.py``).
This module reads the zarr v3 sharding format directly (zarr-specs, "sharding_indexed" codec): the
shard's chunk index at its end (``(offset, nbytes)`` uint64 pairs, then a CRC-32C), then each chunk
(its codec output, then a CRC-32C). For uncompressed chunks one ``preadv`` per contiguous span puts
the bytes straight into the caller's rows; compressed chunks are decompressed into them. Every CRC is
checked, as zarr does. A chunk whose index entry is empty reads as the fill value (zarr's convention;
the cache writer stores every chunk), but a missing shard file raises: the writer stores every shard, so
it was deleted, and reading it as zeros would train a head on zeros.

``RowReader.of(array)`` returns None for any layout it does not know (another store than a local
folder, chunks that are not whole rows, other codecs, big-endian data): the caller then reads with
zarr. The writer (``cache/writer.py``) creates exactly the layout read here.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numcodecs.blosc
import numcodecs.zstd
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.storage import LocalStore

from cache.store import CacheError

_EMPTY = 2**64 - 1  # index entry of a chunk that is not stored
_DECOMPRESS = {ZstdCodec: numcodecs.zstd.decompress, BloscCodec: numcodecs.blosc.decompress}


class ShardReadError(CacheError):
    """A shard file that is missing or does not match its array (checksum, size): names the file."""


def _crc_ok(data, stored: bytes) -> bool:
    return google_crc32c.value(data) == int.from_bytes(stored, "little")


@dataclass(frozen=True)
class RowReader:
    """Reads rows ``[start, stop)`` of one sharded array whose chunks are single rows."""

    folder: Path  # the array's folder
    key: object  # the array's chunk key encoding
    ndim: int
    rows: int
    row_shape: tuple[int, ...]
    dtype: np.dtype
    rows_per_shard: int
    fill_value: object
    decompress: object  # None (uncompressed) or decompress(source, dest)

    @classmethod
    def of(cls, array: zarr.Array) -> RowReader | None:
        """The fast reader for ``array``, or None when its layout is not the cache writer's."""
        store = array.store
        meta = array.metadata
        codecs = getattr(meta, "codecs", ())
        if not isinstance(store, LocalStore) or sys.byteorder != "little" or len(codecs) != 1:
            return None
        shard = codecs[0]
        if not isinstance(shard, ShardingCodec) or shard.index_location != ShardingCodecIndexLocation.end:
            return None
        index_codecs = [type(c) for c in shard.index_codecs]
        inner = list(shard.codecs)
        if index_codecs != [BytesCodec, Crc32cCodec] or not inner or not isinstance(inner[0], BytesCodec):
            return None
        if not isinstance(inner[-1], Crc32cCodec) or len(inner) > 3:
            return None
        if inner[0].endian is not None and inner[0].endian.value != "little":
            return None
        decompress = None
        if len(inner) == 3:
            decompress = _DECOMPRESS.get(type(inner[1]))
            if decompress is None:
                return None
        chunk = tuple(shard.chunk_shape)
        if chunk[0] != 1 or chunk[1:] != tuple(array.shape[1:]):
            return None
        dtype = np.dtype(array.dtype)
        if dtype.byteorder == ">":
            return None
        return cls(
            folder=Path(store.root) / array.path,
            key=meta.chunk_key_encoding,
            ndim=array.ndim,
            rows=array.shape[0],
            row_shape=tuple(array.shape[1:]),
            dtype=dtype,
            rows_per_shard=array.shards[0],
            fill_value=meta.fill_value,
            decompress=decompress,
        )

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``[start, stop)`` as (stop - start, *row_shape), into ``out`` when given (C-contiguous)."""
        if not 0 <= start <= stop <= self.rows:
            raise IndexError(f"{self.folder}: rows [{start}, {stop}) outside [0, {self.rows})")
        if out is None:
            out = np.empty((stop - start, *self.row_shape), self.dtype)
        elif out.shape != (stop - start, *self.row_shape) or out.dtype != self.dtype or not out.flags.c_contiguous:
            raise ValueError(f"{self.folder}: out must be C-contiguous {self.dtype} of shape {(stop - start, *self.row_shape)}")
        row_nbytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        flat = out.reshape(-1).view(np.uint8).reshape(stop - start, row_nbytes)  # one byte row per array row
        s = start
        while s < stop:
            shard = s // self.rows_per_shard
            e = min(stop, (shard + 1) * self.rows_per_shard)
            self._read_shard(shard, s - shard * self.rows_per_shard, e - s, flat[s - start : e - start], out[s - start : e - start])
            s = e
        return out

    def _read_shard(self, shard: int, first: int, count: int, dest: np.ndarray, rows: np.ndarray) -> None:
        path = self.folder / self.key.encode_chunk_key((shard,) + (0,) * (self.ndim - 1))
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError as e:
            raise ShardReadError(
                f"{path}: shard missing (deleted or never written); run `stctx cache verify` and re-extract the video"
            ) from e
        try:
            size = os.fstat(fd).st_size
            index_nbytes = 16 * self.rows_per_shard + 4
            if size < index_nbytes:
                raise ShardReadError(f"{path}: {size} bytes, shorter than its chunk index ({index_nbytes})")
            index = os.pread(fd, index_nbytes, size - index_nbytes)
            if not _crc_ok(index[:-4], index[-4:]):
                raise ShardReadError(f"{path}: chunk index checksum mismatch")
            entries = np.frombuffer(index, "<u8", 2 * self.rows_per_shard).reshape(-1, 2)[first : first + count]
            offsets, lengths = entries[:, 0], entries[:, 1]
            empty = offsets == _EMPTY
            if empty.any():
                rows[empty] = self.fill_value
            present = np.flatnonzero(~empty)
            if self.decompress is None:
                self._read_raw(fd, path, offsets, lengths, present, dest)
            else:
                self._read_compressed(fd, path, offsets, lengths, present, dest)
        finally:
            os.close(fd)

    def _read_raw(self, fd: int, path: Path, offsets, lengths, present, dest: np.ndarray) -> None:
        """Uncompressed chunks: one preadv per run of chunks that follow each other in the file."""
        row_nbytes = dest.shape[1]
        if (lengths[present] != row_nbytes + 4).any():
            raise ShardReadError(f"{path}: a chunk's size differs from {row_nbytes} bytes + checksum")
        crcs = np.empty((len(dest), 4), np.uint8)
        i = 0
        while i < len(present):
            j = i + 1
            while j < len(present) and offsets[present[j]] == offsets[present[j - 1]] + lengths[present[j - 1]]:
                j += 1
            buffers = [b for r in present[i:j] for b in (dest[r], crcs[r])]
            want = int(lengths[present[i:j]].sum())
            got = os.preadv(fd, buffers, int(offsets[present[i]]))
            if got != want:
                raise ShardReadError(f"{path}: read {got} of {want} bytes at offset {int(offsets[present[i]])}")
            i = j
        for r in present:
            if not _crc_ok(dest[r], crcs[r].tobytes()):
                raise ShardReadError(f"{path}: chunk {r} checksum mismatch")

    def _read_compressed(self, fd: int, path: Path, offsets, lengths, present, dest: np.ndarray) -> None:
        """Compressed chunks: one read of the span that holds them, then each chunk decompressed in place."""
        if not len(present):
            return
        lo = int(offsets[present].min())
        hi = int((offsets[present] + lengths[present]).max())
        span = os.pread(fd, hi - lo, lo)
        if len(span) != hi - lo:
            raise ShardReadError(f"{path}: read {len(span)} of {hi - lo} bytes at offset {lo}")
        view = np.frombuffer(span, np.uint8)
        for r in present:
            a = int(offsets[r]) - lo
            b = a + int(lengths[r])
            if not _crc_ok(view[a : b - 4], view[b - 4 : b].tobytes()):
                raise ShardReadError(f"{path}: chunk {r} checksum mismatch")
            self.decompress(view[a : b - 4], dest[r])
