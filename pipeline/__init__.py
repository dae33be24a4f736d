"""stctx's pipeline library, one sub-package per stage of the data flow; the Luigi tasks (``tasks.py``) call it.

- ``pipeline.ava``: AVA v2.2 files, their validation, frames from movies, proposals and split indexes, frame-mAP.
- ``pipeline.mini``: the generated mini-AVA and its contact sheet.
- ``pipeline.features``: keyframe clips, the SlowFast backbone and its checkpoints, extraction into the cache.
- ``pipeline.training``: training loops: the backbone fine-tuned on frames, heads trained from the cache.
- ``pipeline.report``: Table 1 (markdown, CSV, plot). ``pipeline.cli``: the ``stctx`` command.
- ``pipeline.errors``: ``InputError``, the one-line ``file:line: what was expected`` error of every reader.
- ``pipeline.outputs``: atomic files, temporary folders of dead runs removed, write errors that name the path.

Imports flow one way: ava <- mini, ava <- features <- training; each sub-package's docstring says what it may
import. Nothing here imports luigi.
"""
