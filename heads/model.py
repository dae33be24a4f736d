"""The heads: the linear baseline and the cross-attention context head, and ``build_head``.

Shape legend: N boxes, B clips, Q actor tokens per box (1 pooled, R*R grid), M most boxes in one clip,
C_s/C_f slow/fast channels, C = C_s + C_f, R RoI side (7), H W map height/width, T_f fast frames,
L context tokens, D width, K classes.

Boxes of one clip share its context, and a query token never attends to another query, so the heads
pack the boxes of each clip into one query sequence of M*Q tokens and attend once per clip to that
clip's tokens: keys and values are projected once per clip, never copied per box. A context with one row
per box (``actor_seq``, the "st-roi" heads) is placed in the same packing, one row per query slot (B*M
rows, unused slots zeros), and the packed queries are viewed as (B*M, Q, D) for its block: each box's
queries attend to its own tokens, with no per-box loop. Only the attention reads the packed rows (``ClipPacking``):
the residual stream, the norms, the feed-forward layers and their dropout run on the N*Q real tokens, not on the
padding (about a third of the packed rows on the mini-AVA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from heads.blocks import cross_attention_block, position_1d, position_2d
from heads.config import HeadConfig
from heads.inputs import HeadInputs
from heads.packing import ClipPacking, clip_slots, key_padding, pack_into

Context = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def query_points(box_map: torch.Tensor, side: int) -> torch.Tensor:
    """(N, 4) boxes in map cells -> (N, side*side, 2) (row, col) map indices of the centres of a side x side
    grid over each box (side 1: the box centre), row-major like a flattened RoI. A map cell's index is its
    corner, so a point at x cells has index x - 0.5."""
    steps = (torch.arange(side, device=box_map.device, dtype=box_map.dtype) + 0.5) / side  # (S,)
    x1, y1, x2, y2 = box_map.unbind(-1)  # (N,) each
    rows = y1[:, None] + steps[None] * (y2 - y1)[:, None] - 0.5  # (N, S)
    cols = x1[:, None] + steps[None] * (x2 - x1)[:, None] - 0.5  # (N, S)
    grid = torch.stack(torch.broadcast_tensors(rows[:, :, None], cols[:, None, :]), dim=-1)  # (N, S, S, 2)
    return grid.reshape(len(box_map), side * side, 2)


class PooledActorTokens(nn.Module):
    """One token per actor: the 7x7 RoI features max-pooled, projected to D."""

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.C_s + cfg.C_f, cfg.width)

    def forward(self, actor: torch.Tensor) -> torch.Tensor:
        """(N, C, R, R) -> (N, 1, D)."""
        return self.proj(actor.amax(dim=(2, 3)))[:, None]  # (N, 1, D)


class GridActorTokens(nn.Module):
    """G*G tokens per actor (the RoI layout kept; G = ``query_grid``, the 7x7 RoI max-pooled to G x G when
    G < R), projected to D, plus an embedding of the layout."""

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.grid = cfg.query_grid
        self.proj = nn.Linear(cfg.C_s + cfg.C_f, cfg.width)
        self.pos = position_2d(cfg.actor_pos, cfg, cfg.query_grid)

    def forward(self, actor: torch.Tensor) -> torch.Tensor:
        """(N, C, R, R) -> (N, G*G, D)."""
        if actor.shape[-1] != self.grid:
            actor = F.adaptive_max_pool2d(actor, self.grid)  # (N, C, G, G)
        x = self.proj(actor.flatten(2).transpose(1, 2))  # (N, G*G, D)
        return x + self.pos(tuple(actor.shape[2:]), x)


class MapTokens(nn.Module):
    """Context tokens from time-pooled maps: channel-concat of ``fields``, one token per map position."""

    def __init__(self, fields: tuple[str, ...], channels: int, cfg: HeadConfig):
        super().__init__()
        self.fields = fields
        self.proj = nn.Linear(channels, cfg.width)
        self.norm = nn.LayerNorm(cfg.width)
        self.pos = position_2d(cfg.spatial_pos, cfg, cfg.max_positions)

    def forward(self, batch: HeadInputs, slot: torch.Tensor, m: int) -> Context:
        """-> tokens (B, H*W, D), key positions (H*W, D), key_padding_mask (B, H*W) or None. The queries'
        packing (``slot``, ``m``: see ``BoxSequenceTokens``) does not concern a per-clip context."""
        x = torch.cat([batch.require(f) for f in self.fields], dim=1)  # (B, C, H, W)
        tokens = self.norm(self.proj(x.flatten(2).transpose(1, 2)))  # (B, H*W, D)
        return tokens, self.pos(tuple(x.shape[2:]), tokens), key_padding(batch.valid)


class SequenceTokens(nn.Module):
    """Context tokens from a space-pooled sequence: one token per time step."""

    def __init__(self, field: str, channels: int, cfg: HeadConfig):
        super().__init__()
        self.field = field
        self.proj = nn.Linear(channels, cfg.width)
        self.norm = nn.LayerNorm(cfg.width)
        self.pos = position_1d(cfg.temporal_pos, cfg, cfg.max_positions)

    def forward(self, batch: HeadInputs, slot: torch.Tensor, m: int) -> Context:
        """-> tokens (B, T, D), key positions (T, D), no padding mask (every clip has T steps). The queries'
        packing (``slot``, ``m``: see ``BoxSequenceTokens``) does not concern a per-clip context."""
        x = batch.require(self.field)  # (B, C, T)
        tokens = self.norm(self.proj(x.transpose(1, 2)))  # (B, T, D)
        return tokens, self.pos(tuple(x.shape[2:]), tokens), None


class BoxSequenceTokens(SequenceTokens):
    """Context tokens from a sequence with one row per box (``actor_seq``): each box's own tokens, one per time
    step, in the query slots of ``pack_by_clip``.

    The same projection, LayerNorm and temporal encoding as ``SequenceTokens`` (same parameters, same names), so
    with every box's sequence equal to its clip's ``fast_seq`` it gives each box its clip's tokens.
    """

    def forward(self, batch: HeadInputs, slot: torch.Tensor, m: int) -> Context:
        """``slot`` (N,), ``m``: where ``pack_by_clip`` put each box's queries (row ``slot[n]`` of B*M) ->
        tokens (B*M, T, D), box n's in row ``slot[n]`` and zeros in unused slots, key positions (T, D), no padding
        mask (every box has T steps)."""
        x = batch.require(self.field)  # (N, C, T)
        tokens = self.norm(self.proj(x.transpose(1, 2)))  # (N, T, D)
        slots = pack_into(tokens, slot, batch.num_clips, m).view(-1, *tokens.shape[1:])  # (B*M, T, D)
        return slots, self.pos(tuple(x.shape[2:]), slots), None


def spatial_context(cfg: HeadConfig) -> list[nn.Module]:
    """Table 1 "spatial": one block over the H*W tokens of time-pooled concat(slow, fast)."""
    return [MapTokens(("slow", "fast"), cfg.C_s + cfg.C_f, cfg)]


def spatiotemporal_context(cfg: HeadConfig) -> list[nn.Module]:
    """Table 1 "st": a block over time-pooled slow (H*W tokens), then one over space-pooled fast (T_f tokens)."""
    return [MapTokens(("slow",), cfg.C_s, cfg), SequenceTokens("fast_seq", cfg.C_f, cfg)]


def box_spatiotemporal_context(cfg: HeadConfig) -> list[nn.Module]:
    """"st-roi": "st" whose second block reads each box's own fast sequence (T_f tokens per box) instead of the
    clip's space-pooled one."""
    return [MapTokens(("slow",), cfg.C_s, cfg), BoxSequenceTokens("actor_seq", cfg.C_f, cfg)]


class BaselineHead(nn.Module):
    """Table 1 row 1: max-pool the 7x7 RoI features, dropout, linear C -> K."""

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.config = cfg
        self.dropout = nn.Dropout(cfg.cls_dropout)
        self.proj = nn.Linear(cfg.C_s + cfg.C_f, cfg.K)

    def forward(self, batch: HeadInputs) -> torch.Tensor:
        """HeadInputs (only ``actor`` is read) -> logits (N, K)."""
        return self.proj(self.dropout(batch.actor.amax(dim=(2, 3))))  # (N, K)


class ContextHead(nn.Module):
    """Actor tokens -> one cross-attention block per context source -> max over tokens -> two linears.

    A source's context has one row per clip (B, L, D): a clip's M*Q packed queries attend to it together; or one
    row per query slot (B*M, L, D), ``BoxSequenceTokens``: each box's Q queries attend to their own row.
    """

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.config = cfg
        self.actor = {"pooled": PooledActorTokens, "grid": GridActorTokens}[cfg.queries](cfg)
        contexts = {"spatial": spatial_context, "st": spatiotemporal_context, "st-roi": box_spatiotemporal_context}
        self.sources = nn.ModuleList(contexts[cfg.context](cfg))
        self.blocks = nn.ModuleList(cross_attention_block(cfg) for _ in self.sources)
        # Pre-norm blocks leave the residual stream unnormalised; post-norm blocks end in a LayerNorm.
        self.norm = nn.LayerNorm(cfg.width) if cfg.norm == "pre" else nn.Identity()
        self.classifier = nn.Sequential(
            nn.Linear(cfg.width, cfg.width),
            nn.ReLU(),
            nn.Dropout(cfg.cls_dropout),
            nn.Linear(cfg.width, cfg.K),
        )

    def forward(self, batch: HeadInputs) -> torch.Tensor:
        """HeadInputs (actor, box_clip, box_map with ``query_pos="box"``, and the fields in ``config.needs``)
        -> logits (N, K)."""
        num_clips = batch.num_clips
        if num_clips is None:
            raise ValueError(f"head {self.config.name} reads {sorted(self.config.needs)}, but the batch holds none of its "
                             "per-clip fields")
        x = self.actor(batch.actor)  # (N, Q, D): the residual stream stays per box; only the attention is packed
        slot, m = clip_slots(batch.box_clip, num_clips)
        qpos = None
        if self.config.query_pos == "box":
            points = query_points(batch.require("box_map"), self.config.query_grid if self.config.queries == "grid" else 1)
            encode = next(s.pos for s in self.sources if isinstance(s, MapTokens))
            qpos = pack_into(encode.at(points).to(x.dtype), slot, num_clips, m)  # (B, M*Q, D), packed like the queries
        for block, source in zip(self.blocks, self.sources):
            ctx, pos, pad = source(batch, slot, m)  # (B, L, D) per clip or (B*M, L, D) per query slot
            # the queries of each context row: (B, M*Q, D) or (B*M, Q, D)
            packing = ClipPacking(slot, num_clips, m, rows=len(ctx))
            x = block(x, ctx, pos, pad, qpos if isinstance(source, MapTokens) else None, pack=packing)
        x = self.norm(x)  # (N, Q, D)
        return self.classifier(x.amax(dim=1))  # (N, K)


def build_head(cfg: HeadConfig) -> nn.Module:
    """The head for ``cfg``; its ``forward(HeadInputs) -> (N, K)`` logits, and ``.config`` is ``cfg``.

    ``cfg`` must be resolved: sizes left to the features are filled by ``cfg.resolve(features)``."""
    if cfg.unresolved:
        raise ValueError(f"head {cfg.name}: {', '.join(cfg.unresolved)} unset (taken from the features); build it "
                         "from cfg.resolve(features), the config at the sizes a store records "
                         "(pipeline.training.head.feature_spec)")
    if cfg.context == "acrn":
        from heads.acrn import AcrnHead

        return AcrnHead(cfg)
    if cfg.context == "acar":
        from heads.acar import AcarHead

        return AcarHead(cfg)
    if cfg.context == "lfb":
        from heads.lfb import LfbHead

        return LfbHead(cfg)
    return {"none": BaselineHead, "spatial": ContextHead, "st": ContextHead, "st-roi": ContextHead}[cfg.context](cfg)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
