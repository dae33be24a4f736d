"""The head family: one frozen config, the Table 1 variants as named ``replace()``s, the ablation list.

A variant is two structural choices on top of shared sizes:

- ``queries``: ``"pooled"`` gives each actor one token (its 7x7 RoI features max-pooled), ``"grid"`` keeps
  the 7x7 layout as 49 tokens (the paper's "-sa" rows).
- ``context``: ``"none"`` is the linear baseline; ``"spatial"`` is one cross-attention block over the H*W
  tokens of the time-pooled concat(slow, fast) map; ``"st"`` is a block over the H*W tokens of the
  time-pooled slow map followed by a block over the T_f tokens of the space-pooled fast sequence.
- ``"st-roi"`` (beyond the paper): ``"st"`` with temporal tokens that keep the actor's place. The first block is
  ``"st"``'s; in the second, each box's queries attend to the T_f tokens of its own fast sequence (``actor_seq``:
  its RoI on each fast frame, max-pooled) instead of the whole frame's average, which every actor of a clip
  shares. With every box's sequence set to its clip's ``fast_seq`` it computes exactly what ``"st"`` computes.

Defaults where the paper is silent (all fields, so an ablation can change them):

- ``C_s``/``C_f``, ``width`` D, ``n_heads`` and ``query_grid`` are unset in every variant: they follow from the
  features (``HeadConfig.resolve``, the rule at ``feature_scale``). At r50 sizes: D = 256, ``n_heads`` = 8 (32
  dims per head, the DETR/Transformer-base per-head size, at a width that keeps the head around 2 M parameters,
  small next to the 2304-d inputs it projects) and the paper's 7x7 grid queries. An explicit value in a variant
  or an override is kept.
- ``ffn_ratio`` = 4 with GELU: the Transformer default.
- ``norm`` = ``"pre"``: pre-norm residual blocks train without warm-up and are robust to the large,
  post-ReLU magnitudes of SlowFast features; ``"post"`` (the original Transformer) stays selectable.
- ``dropout`` = 0.1 on residual branches, ``attn_dropout`` = 0.0, ``cls_dropout`` = 0.5 before the last
  linear layer (0.5 is the SlowFast AVA head's dropout, so the baseline row matches the backbone's head).
- ``spatial_pos`` = ``"sine"``: 2D sine encoding of absolute map indices (row, col). It exists for every
  H, W and does not depend on how far a map was padded, so mixed aspect ratios need no interpolation.
  ``"learned"`` is a factorised row/col table of ``max_positions`` entries each, also indexed absolutely.
- ``temporal_pos`` = ``"sine"``: 1D sine encoding of the fast frame index.
- ``actor_pos`` = ``"learned"``: a learned (factorised row/col) embedding of the 7x7 layout for grid
  queries (ignored by pooled queries, which have no layout).
- ``query_pos`` = ``"box"`` in every context variant: each actor query gets the same 2D sine encoding as the
  map tokens, taken at its own place on the map (a pooled query at its box centre, a grid token at the centre
  of its RoI cell), added in the blocks over map tokens (DETR's query positions). Without it a query knows
  what the actor looks like but not where it is, so attention can ask "is there a person anywhere?" but not
  "... in front of me?" (tests/test_heads.py: a left-or-right relation is learned to 100 % with it, 51 %
  without). On the mini-AVA it changed nothing measurable (seed 0, mini sizes, 4-epoch backbone: spatial-sa
  62.74 vs 62.29 mAP, spatial 59.60 vs 59.70; 8-epoch backbone: 66.07 vs 66.39, 64.65 vs 64.55): the heads
  learned carry/hold and watch, the classes that need it, as well without it; we keep it because the test
  above shows what it makes possible. Needs ``spatial_pos="sine"``. The dataclass default is ``"none"`` so
  that configs saved before the field existed keep their meaning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, replace
from typing import Any, Iterable, Literal, Mapping

Queries = Literal["pooled", "grid"]
Context = Literal["none", "spatial", "st", "st-roi", "acrn", "acar", "lfb"]
Norm = Literal["pre", "post"]
Activation = Literal["relu", "gelu"]
SpatialPos = Literal["sine", "learned", "none"]
TemporalPos = Literal["sine", "learned", "none"]
ActorPos = Literal["learned", "sine", "none"]
QueryPos = Literal["box", "none"]

# Which HeadInputs fields each context structure reads, so a cache reader loads only those.
_NEEDS: dict[str, frozenset[str]] = {
    "none": frozenset(),
    "spatial": frozenset({"slow", "fast"}),
    "st": frozenset({"slow", "fast_seq"}),
    "st-roi": frozenset({"slow", "actor_seq"}),
    "acrn": frozenset({"slow", "fast"}),
    "acar": frozenset({"slow", "fast"}),
    "lfb": frozenset({"bank"}),
}

# The sizes that follow from the features a head reads; None in a config means "from the features" (``resolve``).
FROM_FEATURES: tuple[str, ...] = ("C_s", "C_f", "width", "n_heads", "query_grid")


@dataclass(frozen=True)
class HeadConfig:
    """One head of the family; see the module docstring for the defaults and why.

    Sizes: ``C_s``/``C_f`` slow/fast channels of the cached maps, ``K`` classes, ``roi_size`` the RoIAlign
    output side (actor features are (C_s + C_f, roi_size, roi_size)), ``query_grid`` the side of a grid
    query's token layout (``roi_size``, the paper's 7x7, or the RoI max-pooled to a smaller grid),
    ``width`` the attention width D. The sizes that depend on the features (``FROM_FEATURES``: C_s, C_f, width,
    n_heads, query_grid) may be None, "from the features": ``resolve`` fills them from what a store records, and
    ``build_head`` refuses a config that still has one unset.
    """

    name: str = "st-sa"
    queries: Queries = "grid"
    context: Context = "st"
    C_s: int | None = None
    C_f: int | None = None
    K: int = 80
    roi_size: int = 7
    query_grid: int | None = None
    width: int | None = None
    n_heads: int | None = None
    ffn_ratio: float = 4.0
    activation: Activation = "gelu"
    norm: Norm = "pre"
    dropout: float = 0.1
    attn_dropout: float = 0.0
    cls_dropout: float = 0.5
    spatial_pos: SpatialPos = "sine"
    temporal_pos: TemporalPos = "sine"
    actor_pos: ActorPos = "learned"
    query_pos: QueryPos = "none"
    max_positions: int = 64
    sine_temperature: float = 10000.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            hint = _HINTS[f.name]
            choices = typing.get_args(hint) if typing.get_origin(hint) is Literal else ()
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ValueError(f"HeadConfig.{f.name}={value!r}: expected one of {choices}")
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise ValueError(f"HeadConfig.name={self.name!r}: expected a slug of letters, digits, '-', '_', '.'")
        for size in ("C_s", "C_f", "K", "roi_size", "query_grid", "width", "n_heads", "max_positions"):
            value = getattr(self, size)
            if value is None and size in FROM_FEATURES:
                continue
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"HeadConfig.{size}={value!r}: expected a positive int"
                                 + (" or None (from the features)" if size in FROM_FEATURES else ""))
        if self.query_grid is not None and self.query_grid > self.roi_size:
            raise ValueError(f"HeadConfig.query_grid={self.query_grid} exceeds roi_size={self.roi_size}")
        if self.width is not None and self.n_heads is not None and self.width % self.n_heads:
            raise ValueError(f"HeadConfig.width={self.width} is not divisible by n_heads={self.n_heads}")
        if self.width is not None and self.width % 4:
            raise ValueError(f"HeadConfig.width={self.width}: the 2D positional encodings need a multiple of 4")
        for p in ("dropout", "attn_dropout", "cls_dropout"):
            if not 0.0 <= getattr(self, p) < 1.0:
                raise ValueError(f"HeadConfig.{p}={getattr(self, p)!r}: expected a probability in [0, 1)")
        if self.ffn_ratio <= 0 or self.sine_temperature <= 0:
            raise ValueError("HeadConfig.ffn_ratio and sine_temperature must be positive")
        if self.query_pos == "box" and self.spatial_pos != "sine":
            raise ValueError("HeadConfig.query_pos='box' places queries with the sine encoding; it needs spatial_pos='sine'")
        if self.context == "none" and self.queries != "pooled":
            raise ValueError("HeadConfig: the baseline (context='none') has no actor tokens; use queries='pooled'")

    @property
    def needs(self) -> frozenset[str]:
        """HeadInputs fields besides ``actor``/``box_clip`` that this head reads (subset of slow, fast, fast_seq,
        actor_seq, bank)."""
        return _NEEDS[self.context]

    @property
    def slug(self) -> str:
        """The readable name for paths and table rows (the variant name)."""
        return self.name

    def digest(self, n: int = 8) -> str:
        """Short sha256 of every field, for ``<slug>-<digest>`` output paths."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:n]

    @property
    def unresolved(self) -> tuple[str, ...]:
        """The sizes still unset (None, "from the features"); empty once ``resolve`` has filled them."""
        return tuple(f for f in FROM_FEATURES if getattr(self, f) is None)

    def resolve(self, features: Mapping[str, Any]) -> HeadConfig:
        """This config at the sizes of the features a store records.

        ``features``: ``C_s``/``C_f`` channels, ``T_f`` fast frames and ``map_hw``, the (H, W) of every map size
        (``pipeline.training.head.feature_spec`` reads them from a store; other keys are ignored). Unset sizes are
        filled: C_s/C_f with the store's channels, width/n_heads/query_grid by ``feature_scale``; explicit ones are
        kept. An explicit C_s/C_f other than the store's is refused, and so is a head that reads a fast sequence
        (``fast_seq`` or ``actor_seq``) when T_f exceeds ``max_positions``.
        """
        missing = [k for k in ("C_s", "C_f", "T_f", "map_hw") if k not in features]
        if missing:
            raise ValueError(f"head {self.name}: the features lack {missing} (expected C_s, C_f, T_f and map_hw)")
        c_s, c_f, t_f = (int(features[k]) for k in ("C_s", "C_f", "T_f"))
        for size, store in (("C_s", c_s), ("C_f", c_f)):
            if getattr(self, size) not in (None, store):
                raise ValueError(f"head {self.name}: {size}={getattr(self, size)}, but the features have "
                                 f"{size}={store} (leave {size} unset to take the store's)")
        if {"fast_seq", "actor_seq"} & self.needs and t_f > self.max_positions:
            raise ValueError(f"head {self.name}: the features have T_f={t_f} fast frames, more than "
                             f"max_positions={self.max_positions}")
        derived = {"C_s": c_s, "C_f": c_f, **feature_scale(c_s, c_f, features["map_hw"], self.roi_size)}
        return replace(self, **{k: v for k, v in derived.items() if getattr(self, k) is None})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field; ``from_dict`` rebuilds the config from it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HeadConfig:
        """Inverse of ``to_dict``. Unknown keys are an error; missing keys take today's defaults.

        Missing keys are allowed so that checkpoints written before a field existed still load: a new
        field's default must reproduce the behaviour from before it existed.
        """
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"HeadConfig.from_dict: unknown fields {sorted(unknown)}")
        return cls(**d)


_HINTS = typing.get_type_hints(HeadConfig)

_BASE = HeadConfig(query_pos="box")

VARIANTS: dict[str, HeadConfig] = {
    "baseline": replace(_BASE, name="baseline", queries="pooled", context="none", query_pos="none"),
    "spatial": replace(_BASE, name="spatial", queries="pooled", context="spatial"),
    "spatial-sa": replace(_BASE, name="spatial-sa", queries="grid", context="spatial"),
    "st": replace(_BASE, name="st", queries="pooled", context="st"),
    "st-sa": replace(_BASE, name="st-sa", queries="grid", context="st"),
}

# The context heads of the field on the same cache (ContextZoo): the actor-centric relation network of mmaction2
# (``heads/acrn.py``), ACAR-Net's high-order relation reasoning (``heads/acar.py``) and the long-term feature bank
# read by FBO-NL (``heads/lfb.py``, the bank from ``cache/bank.py``). Pooled actor features, no query positions:
# none has tokens; their own sizes follow their sources (see each module).
VARIANTS |= {
    "acrn": replace(_BASE, name="acrn", queries="pooled", context="acrn", query_pos="none"),
    # ACAR-Net's AVA configs train without dropout before the classifier (its HR2O blocks have their own)
    "acar": replace(_BASE, name="acar", queries="pooled", context="acar", query_pos="none", cls_dropout=0.0),
    "lfb": replace(_BASE, name="lfb", queries="pooled", context="lfb", query_pos="none"),
}

# Beyond the paper: "st" whose temporal block reads each actor's own fast sequence (``actor_seq``) instead of the
# clip's. No published number exists (neither in the paper nor elsewhere), so none is in PUBLISHED.
VARIANTS |= {
    "st-roi": replace(_BASE, name="st-roi", queries="pooled", context="st-roi"),
    "st-roi-sa": replace(_BASE, name="st-roi-sa", queries="grid", context="st-roi"),
}

ABLATION: tuple[str, ...] = ("baseline", "spatial", "spatial-sa", "st", "st-sa")
ZOO: tuple[str, ...] = ABLATION + ("acrn", "acar", "lfb", "st-roi", "st-roi-sa")

# Frame-mAP@0.5 on AVA v2.2 val, Table 1 of the paper.
PAPER_MAP: dict[str, float] = {
    "baseline": 24.80,
    "spatial": 26.50,
    "spatial-sa": 26.75,
    "st": 26.65,
    "st-sa": 27.02,
}

# Published frame-mAP@0.5 on AVA v2.2 val of each zoo head, trained end to end by its authors on a SlowFast R50
# (Kinetics-400 init), and where the number comes from: a reference beside our numbers, never one of them.
PUBLISHED: dict[str, tuple[float, str]] = {
    **{name: (value, "the paper, Table 1") for name, value in PAPER_MAP.items()},
    "acrn": (27.71, "mmaction2 model zoo, slowfast-acrn 8x8x1 ava22"),
    "acar": (27.83, "ACAR-Net model zoo, SLOWFAST_R50_ACAR_HR2O"),
    "lfb": (25.8, "the LFB paper, I3D R50-NL on AVA v2.1 (not v2.2, not SlowFast)"),
}

# Sizes from the features. C_s/C_f are the channels of the store a head reads. The head's scale follows from the
# sizes the store records by one rule, ``feature_scale``; at the two backbone presets it gives
#   r50  (C_s 2048, C_f 256, maps about 16x29): width 256, n_heads 8, query_grid 7 (the paper's 7x7 tokens);
#   mini (C_s 128, C_f 32, maps 6x10 and 6x8): width 128, n_heads 4, query_grid 3.
# - width D: the largest power of two not above the C = C_s + C_f actor channels, at most 256. 256 keeps the r50
#   head around 2 M parameters, small next to its 2304-d inputs; below that, D stays close to C, because a
#   narrower projection loses what the baseline's linear layer reads from the actor features. Measured on the
#   mini-AVA (seed 0, st-sa, 4-epoch backbone; baseline 57.2 mAP): width 32 gave 59.1 at 7x7 tokens; width 128
#   gave 61.1 at 7x7 (245 s) and 61.7 at 3x3 (63 s). With an 8-epoch backbone (baseline 61.5) width 32 put every
#   context head about 2 mAP *below* the baseline: its 160 -> 32 projection loses what the baseline reads (hand
#   wave AP 20 vs 28).
# - n_heads: D / 32, 32 dims per head (the DETR/Transformer-base per-head size).
# - query_grid G: half the smallest map side, at most roi_size. A grid query's G x G tokens are no finer than the
#   map cells under a box that spans half the map; finer grids resample the same cells (an actor spans about 2x1
#   cells of the 6x10 mini map, so 49 tokens resample the same few cells: 3x3 above, 4x faster and no worse).
MAX_WIDTH = 256
HEAD_DIM = 32


def feature_scale(C_s: int, C_f: int, map_hw: Iterable[Iterable[int]], roi_size: int = 7) -> dict[str, int]:
    """The head scale for C_s + C_f feature channels on maps of the sizes ``map_hw`` ((H, W) pairs): ``width``,
    ``n_heads`` and ``query_grid`` by the rule above."""
    map_hw = [tuple(hw) for hw in map_hw]
    sides = [int(side) for hw in map_hw for side in hw]
    if not sides or min(sides) < 1 or any(len(hw) != 2 for hw in map_hw):
        raise ValueError(f"feature_scale: expected the (H, W) of at least one map, got {map_hw!r}")
    width = min(MAX_WIDTH, 1 << ((C_s + C_f).bit_length() - 1))
    return {"width": width, "n_heads": max(1, width // HEAD_DIM), "query_grid": max(1, min(roi_size, min(sides) // 2))}


def variant(name: str, **overrides: Any) -> HeadConfig:
    """``VARIANTS[name]`` with field overrides; sizes left unset come from the features (``HeadConfig.resolve``)."""
    if name not in VARIANTS:
        raise KeyError(f"unknown head variant {name!r}; known: {sorted(VARIANTS)}")
    return replace(VARIANTS[name], **overrides)
