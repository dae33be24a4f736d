"""The feature cache: a content-addressed Zarr v3 store of SlowFast maps, boxes and actor features.

Schema: ``cache.schema``; opening and identity: ``cache.store``; writing a video: ``cache.writer``;
reading for heads: ``cache.reader``; ``stctx cache info|verify``: ``cache.verify``.
"""

from cache.reader import (
    CacheDataset,
    DeviceLoader,
    KeyframeBlockSampler,
    collate_runs,
    make_loader,
    recompute_actor_features,
    to_device,
)
from cache.schema import SCHEMA_VERSION, StorageConfig
from cache.store import (
    CacheError,
    CacheSpec,
    FeatureStore,
    IncompleteVideoError,
    SchemaVersionError,
    StoreMismatchError,
    store_name,
)
from cache.verify import store_info, verify_store
from cache.writer import BoxTable, VideoExistsError, VideoWriter

__all__ = [
    "SCHEMA_VERSION",
    "BoxTable",
    "CacheDataset",
    "CacheError",
    "CacheSpec",
    "DeviceLoader",
    "FeatureStore",
    "IncompleteVideoError",
    "KeyframeBlockSampler",
    "SchemaVersionError",
    "StorageConfig",
    "StoreMismatchError",
    "VideoExistsError",
    "VideoWriter",
    "collate_runs",
    "make_loader",
    "recompute_actor_features",
    "store_info",
    "store_name",
    "to_device",
    "verify_store",
]
