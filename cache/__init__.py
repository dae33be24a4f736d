"""The feature cache: a content-addressed Zarr v3 store of SlowFast maps, boxes and actor features.

Schema: ``cache.schema``; opening and identity: ``cache.store``; the boxes of keyframes: ``cache.boxes``;
boxes to pixels and RoIAlign: ``cache.roi``; writing a video: ``cache.writer``;
reading for heads: ``cache.reader`` (local stores through ``cache.shards``, straight from the shard files);
``stctx cache ls|info|verify``: ``cache.verify``; ``stctx cache stats``, ``export-h5``, ``gc``: ``cache.stats``,
``cache.export`` (over ``cache.selection``), ``cache.gc``. Besides ``cache`` itself the package imports only the
dependency-free ``pipeline.errors``, ``pipeline.outputs`` and ``pipeline.progress`` (one-line errors, atomic files,
progress bars of the tools).

Names are imported on first use, so the writer and ``stctx cache`` start without importing torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CacheDataset": "cache.reader",
    "DeviceLoader": "cache.reader",
    "KeyframeBlockSampler": "cache.reader",
    "collate_runs": "cache.reader",
    "make_loader": "cache.reader",
    "to_device": "cache.reader",
    "KeyframeBoxes": "cache.boxes",
    "actor_features": "cache.roi",
    "box_pixels": "cache.roi",
    "SCHEMA_VERSION": "cache.schema",
    "StorageConfig": "cache.schema",
    "CacheError": "cache.store",
    "CacheSpec": "cache.store",
    "FeatureStore": "cache.store",
    "IncompleteVideoError": "cache.store",
    "MissingChunkError": "cache.store",
    "NotAFeatureStoreError": "cache.store",
    "SchemaVersionError": "cache.store",
    "StoreMismatchError": "cache.store",
    "store_name": "cache.store",
    "store_info": "cache.verify",
    "verify_store": "cache.verify",
    "VideoExistsError": "cache.writer",
    "VideoOriginError": "cache.writer",
    "VideoClaimedError": "cache.claims",
    "ClaimLostError": "cache.claims",
    "claim_video": "cache.claims",
    "VideoWriter": "cache.writer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cache' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__
