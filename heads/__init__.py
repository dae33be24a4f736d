"""stctx heads: the Table 1 head family (torch only).

    from heads import HeadInputs, build_head, variant
    head = build_head(variant("st-sa").resolve(features))  # features: what the store records (C_s, C_f, T_f, map_hw)
    logits = head(HeadInputs(actor=..., box_clip=..., slow=..., fast_seq=..., valid=..., box_map=...))  # (N, K)

``HeadConfig.needs`` names the context fields a head reads (context heads also place their queries with
``box_map``, the boxes in map cells: ``pipeline.training.head.box_map``); ``to_dict``/``from_dict`` rebuild it from a checkpoint.

Names are imported on first use, so ``heads.config`` (the registry) loads without importing torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CrossAttentionBlock": "heads.blocks",
    "FeedForward": "heads.blocks",
    "LearnedPosition1d": "heads.blocks",
    "LearnedPosition2d": "heads.blocks",
    "NoPosition": "heads.blocks",
    "PostNormCrossAttention": "heads.blocks",
    "PreNormCrossAttention": "heads.blocks",
    "SinePosition1d": "heads.blocks",
    "SinePosition2d": "heads.blocks",
    "cross_attention_block": "heads.blocks",
    "ABLATION": "heads.config",
    "ZOO": "heads.config",
    "FROM_FEATURES": "heads.config",
    "PAPER_MAP": "heads.config",
    "PUBLISHED": "heads.config",
    "VARIANTS": "heads.config",
    "HeadConfig": "heads.config",
    "feature_scale": "heads.config",
    "variant": "heads.config",
    "CONTEXT_FIELDS": "heads.inputs",
    "HeadInputs": "heads.inputs",
    "AcarHead": "heads.acar",
    "AcrnHead": "heads.acrn",
    "LfbHead": "heads.lfb",
    "BaselineHead": "heads.model",
    "ContextHead": "heads.model",
    "build_head": "heads.model",
    "count_parameters": "heads.model",
    "ClipPacking": "heads.packing",
    "clip_slots": "heads.packing",
    "pack_by_clip": "heads.packing",
    "unpack_by_clip": "heads.packing",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'heads' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__
