"""stctx heads: the Table 1 head family (torch only).

    from heads import HeadInputs, build_head, variant
    head = build_head(variant("st-sa", size="mini"))
    logits = head(HeadInputs(actor=..., box_clip=..., slow=..., fast_seq=..., valid=..., box_map=...))  # (N, K)

``HeadConfig.needs`` names the context fields a head reads (context heads also place their queries with
``box_map``, the boxes in map cells: ``pipeline.training.head.box_map``); ``to_dict``/``from_dict`` rebuild it from a checkpoint.
"""

from heads.blocks import (
    CrossAttentionBlock,
    FeedForward,
    LearnedPosition1d,
    LearnedPosition2d,
    NoPosition,
    PostNormCrossAttention,
    PreNormCrossAttention,
    SinePosition1d,
    SinePosition2d,
    cross_attention_block,
)
from heads.config import ABLATION, PAPER_MAP, SIZES, VARIANTS, HeadConfig, variant
from heads.inputs import CONTEXT_FIELDS, HeadInputs
from heads.model import (
    BaselineHead,
    ContextHead,
    build_head,
    count_parameters,
    pack_by_clip,
    unpack_by_clip,
)

__all__ = [
    "ABLATION",
    "CONTEXT_FIELDS",
    "PAPER_MAP",
    "SIZES",
    "VARIANTS",
    "BaselineHead",
    "ContextHead",
    "CrossAttentionBlock",
    "FeedForward",
    "HeadConfig",
    "HeadInputs",
    "LearnedPosition1d",
    "LearnedPosition2d",
    "NoPosition",
    "PostNormCrossAttention",
    "PreNormCrossAttention",
    "SinePosition1d",
    "SinePosition2d",
    "build_head",
    "count_parameters",
    "cross_attention_block",
    "pack_by_clip",
    "unpack_by_clip",
    "variant",
]
