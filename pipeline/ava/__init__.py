"""AVA v2.2 files (one reader per file type), their validation, frames from movies, proposals, split indexes and
frame-mAP evaluation. Imports numpy, pandas, pyarrow, ``pipeline.errors`` and ``cache.boxes``; never torch."""
