"""Luigi tasks of stctx: parameters, dependencies and outputs; each ``run`` calls one library function.

    luigi --module tasks PrepareData          # the mini-AVA (or, with [stctx] dataset = ava, checks the AVA folder)

Every output lives under ``[stctx] root`` of luigi.cfg (default ``runs/``). Paths, devices and worker counts are
not significant parameters; output names are ``<readable slug>-<short hash>`` of the significant ones.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import luigi

from cache.schema import COMPRESSORS, STORAGE_DTYPES, StorageConfig
from heads.config import ABLATION, PAPER_MAP


class stctx(luigi.Config):  # noqa: N801 - the section name of luigi.cfg
    root = luigi.Parameter(default="runs", description="folder that holds every output")
    dataset = luigi.ChoiceParameter(choices=["mini", "ava"], default="mini", description="mini-AVA or real AVA")
    ava_root = luigi.Parameter(default="data/ava", description="AVA v2.2 folder when dataset = ava")


class DatasetParameter(luigi.ChoiceParameter):
    """``mini`` or ``ava``: the task's own setting (command line or its luigi.cfg section), else ``[stctx] dataset``
    (``--stctx-dataset`` or luigi.cfg), else ``mini``.

    The default is ``None``, which ``normalize`` (Luigi applies it to given and default values alike) turns into the
    ``[stctx]`` setting, so a task's identity always names the dataset it runs on.
    """

    def __init__(self, **kwargs):
        super().__init__(choices=["mini", "ava"], default=None,
                         description="mini-AVA or real AVA (default: [stctx] dataset)", **kwargs)

    def normalize(self, x):
        return super().normalize(stctx().dataset if x is None else x)


def root() -> Path:
    return Path(stctx().root)


def short_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


class PrepareData(luigi.Task):
    """The dataset folder: the generated mini-AVA, or a validated real AVA folder.

    mini: generated once into ``<root>/data/mini-<hash>/``; complete only once the generator's marker exists.
    ava: runs the ``stctx ava check`` validation of ``[stctx] ava_root`` and fails with its report.
    """

    dataset = DatasetParameter()
    videos = luigi.OptionalIntParameter(default=None, description="mini-AVA: videos per split (generator default if unset)")
    seconds = luigi.OptionalIntParameter(default=None, description="mini-AVA: seconds per video (generator default if unset)")
    seed = luigi.IntParameter(default=0)
    tiny = luigi.BoolParameter(default=False, description="mini-AVA: the tiny test size")

    def generator_args(self) -> dict:
        args = {"seed": self.seed, "tiny": self.tiny}
        if self.videos is not None:
            args["videos"] = self.videos
        if self.seconds is not None:
            args["seconds"] = self.seconds
        return args

    def generator_identity(self) -> dict:
        """The generator's version and its full configuration, defaults resolved: what the folder name hashes, so a
        new generator version or default size never finds an old folder complete."""
        import dataclasses

        from pipeline.mini.generator import VERSION, MiniAvaConfig

        config = MiniAvaConfig.make(self.videos, self.seconds, self.seed, self.tiny)
        return {"version": VERSION, **dataclasses.asdict(config)}

    def data_root(self) -> Path:
        if self.dataset == "ava":
            return Path(stctx().ava_root)
        return root() / "data" / f"mini-{short_hash(self.generator_identity())}"

    def output(self):
        if self.dataset == "ava":
            return luigi.LocalTarget(root() / "data" / f"ava-check-{short_hash(str(self.data_root().resolve()))}.json")
        return luigi.LocalTarget(self.data_root() / ".complete")

    def run(self):
        if self.dataset == "mini":
            from pipeline.mini.generator import generate_mini_ava

            generate_mini_ava(self.data_root(), **self.generator_args())
            return
        from pipeline.ava.check import check_ava

        report = check_ava(self.data_root())
        if not report.ok:
            raise RuntimeError(f"AVA folder check failed:\n{report.format()}")
        with self.output().temporary_path() as tmp:
            Path(tmp).write_text(json.dumps(report.to_dict(), indent=1))


# ----------------------------------------------------------------------------------------------- backbone

_SPEC_CACHE: dict[tuple, object] = {}


def cached_cache_spec(checkpoint: Path, extraction):
    """``pipeline.features.extract.cache_spec``, remembered per (file, size, mtime, extraction): Luigi asks for outputs
    many times, and hashing a 270 MB checkpoint each time would make a finished pipeline slow to confirm."""
    from pipeline.features.extract import cache_spec

    stat = checkpoint.stat()
    key = (str(checkpoint.resolve()), stat.st_size, stat.st_mtime_ns, extraction)
    if key not in _SPEC_CACHE:
        _SPEC_CACHE[key] = cache_spec(checkpoint, extraction)
    return _SPEC_CACHE[key]


class Backbone(luigi.Task):
    """The SlowFast checkpoint that extraction uses.

    mini: the ``mini`` SlowFast trained end to end with the baseline head on the mini-AVA training split (the
    minimal step this project runs until the end-to-end fine-tuning task exists). ava: ``[Backbone] checkpoint``,
    an AVA-fine-tuned SlowFast on disk (pytorchvideo's detection checkpoint or ours); nothing is downloaded.
    """

    dataset = DatasetParameter()
    epochs = luigi.IntParameter(default=4, description="mini: fine-tuning epochs")
    seed = luigi.IntParameter(default=0)
    checkpoint = luigi.OptionalPathParameter(default=None, significant=False,
                                             description="ava: the backbone checkpoint file")
    device = luigi.OptionalParameter(default=None, significant=False)

    def requires(self):
        return PrepareData(dataset=self.dataset) if self.dataset == "mini" else []

    def output(self):
        if self.dataset == "ava":
            if self.checkpoint is None:
                raise ValueError("dataset = ava needs [Backbone] checkpoint = <SlowFast checkpoint> in luigi.cfg")
            return luigi.LocalTarget(self.checkpoint)
        data = self.requires()
        slug = f"mini-{short_hash({'data': data.data_root().name, 'epochs': self.epochs, 'seed': self.seed})}"
        return luigi.LocalTarget(root() / "backbone" / f"{slug}.pt")

    def run(self):
        if self.dataset == "ava":
            raise FileNotFoundError(f"backbone checkpoint {self.checkpoint} not found")
        from pipeline.training.finetune import train_mini_backbone

        out = Path(self.output().path)
        metrics = train_mini_backbone(self.requires().data_root(), out, epochs=self.epochs, seed=self.seed,
                                      device=self.device)
        out.with_suffix(".json").write_text(json.dumps(metrics, indent=1, default=str))


# ----------------------------------------------------------------------------------------------- cache


class _CacheTask(luigi.Task):
    """Parameters shared by the extraction tasks: the dataset, the backbone and the extraction config.

    Downstream tasks pass them on with ``self.clone(...)``, which copies every parameter the two classes share.
    """

    dataset = DatasetParameter()
    threshold = luigi.FloatParameter(default=0.8, description="detector score for training proposals")
    dtype = luigi.ChoiceParameter(choices=STORAGE_DTYPES, default=StorageConfig.dtype)
    compressor = luigi.ChoiceParameter(choices=COMPRESSORS, default=StorageConfig.compressor)
    device = luigi.OptionalParameter(default=None, significant=False)
    decode_workers = luigi.IntParameter(default=0, significant=False, description="clip decoding processes")

    def backbone(self) -> Backbone:
        return Backbone(dataset=self.dataset)

    def data(self) -> PrepareData:
        return PrepareData(dataset=self.dataset)

    def extraction(self):
        from pipeline.features.extract import ExtractionConfig

        return ExtractionConfig(threshold=self.threshold, dtype=self.dtype, compressor=self.compressor)

    def spec(self):
        """The store's identity, or None while the backbone checkpoint does not exist yet."""
        ckpt = Path(self.backbone().output().path)
        return cached_cache_spec(ckpt, self.extraction()) if ckpt.exists() else None

    def store_url(self) -> Path | None:
        from pipeline.features.extract import store_url

        spec = self.spec()
        return None if spec is None else store_url(root(), spec)


class StoreTarget(luigi.Target):
    """Complete when the store exists and the video group is complete (or, with ``split``, its manifest exists)."""

    def __init__(self, task: _CacheTask, video: str | None = None, split: str | None = None):
        self.task, self.video, self.split = task, video, split

    def exists(self) -> bool:
        from cache.store import CacheError, FeatureStore

        url = self.task.store_url()
        if url is None or not url.exists():
            return False
        try:
            store = FeatureStore.open(url, expect=self.task.spec())
        except CacheError:
            return False
        return store.is_complete(self.video) if self.video is not None else store.manifest(self.split) is not None


class SplitIndex(luigi.Task):
    """A split's proposals, annotated keyframes and frame counts, read once for all its extraction tasks."""

    dataset = DatasetParameter()
    split = luigi.ChoiceParameter(choices=["train", "val"])
    threshold = luigi.FloatParameter(default=0.8)

    def requires(self):
        return PrepareData(dataset=self.dataset)

    def folder(self) -> Path:
        ident = {"data": self.requires().task_id, "data_root": str(self.requires().data_root().resolve())}
        return root() / "index" / f"{self.dataset}-{self.split}-t{self.threshold:g}-{short_hash(ident)}"

    def output(self):
        return luigi.LocalTarget(self.folder() / "proposals.npz")

    def run(self):
        from pipeline.ava.splits import write_split_index

        write_split_index(self.requires().data_root(), self.split, self.threshold, self.folder())


class ExtractVideo(_CacheTask):
    """One video's features in the split's cache store (one Zarr group, its completion marker written last)."""

    split = luigi.ChoiceParameter(choices=["train", "val"])
    video = luigi.Parameter()

    def requires(self):
        index = self.clone(SplitIndex)
        return [self.data(), self.backbone(), index]

    def output(self):
        return StoreTarget(self, video=self.video)

    def run(self):
        from pipeline.features.extract import extract_split_video

        extract_split_video(self.data().data_root(), self.split, self.video, self.backbone().output().path,
                            self.store_url(), self.spec(), self.extraction(), device=self.device,
                            num_workers=self.decode_workers, index=self.requires()[2].folder())


class FeatureCache(_CacheTask):
    """Every video of a split extracted, then the split's manifest committed (written last)."""

    split = luigi.ChoiceParameter(choices=["train", "val"], default="val")

    def requires(self):
        return [self.data(), self.backbone(), self.clone(SplitIndex)]

    def output(self):
        return StoreTarget(self, split=self.split)

    def run(self):
        from pipeline.ava.splits import read_split_index
        from pipeline.features.extract import commit_split

        _, keyframes, _ = read_split_index(self.requires()[2].folder())
        videos = sorted({v for v, _ in keyframes})
        yield [self.clone(ExtractVideo, video=v) for v in videos]
        commit_split(self.store_url(), self.spec(), self.split, videos)


# ----------------------------------------------------------------------------------------------- heads


class TrainHead(_CacheTask):
    """One Table 1 variant trained from the cache with one seed, evaluated on the validation split.

    Output: ``<root>/heads/<variant>-<hash>/seed-<k>/metrics.json`` and ``head.pt``; the hash covers the head
    config (the registry entry plus overrides, at the sizes the store records), the training config and the
    upstream data, backbone and cache parameters, and the feature store's name (so a new backbone checkpoint
    retrains every head); editing one variant's config reruns that variant only.
    """

    variant = luigi.Parameter(default="st-sa")
    seed = luigi.IntParameter(default=0)
    overrides = luigi.DictParameter(default={}, description="HeadConfig field overrides, e.g. {\"width\": 64}")
    epochs = luigi.OptionalIntParameter(default=None, description="default: TrainConfig's")
    lr = luigi.OptionalFloatParameter(default=None)
    box_jitter = luigi.FloatParameter(default=0.0)

    def requires(self):
        return {split: self.clone(FeatureCache, split=split) for split in ("train", "val")}

    def store_features(self) -> dict | None:
        """What the store records of its features (``pipeline.training.head.feature_spec``), None until both splits
        are committed; read once per store."""
        from cache.store import CacheError, FeatureStore
        from pipeline.training.head import feature_spec

        url = self.store_url()
        read_from, features = getattr(self, "_features", (None, None))
        if features is None or read_from != url:
            features = None
            if url is not None:
                try:
                    features = feature_spec(FeatureStore.open(url, expect=self.spec()), ("train", "val"))
                except CacheError:  # no store yet, or a split not committed
                    pass
            self._features = (url, features)
        return features

    def head_config(self):
        """The variant with its overrides, the sizes it leaves to the features resolved against what the store
        records (``HeadConfig.resolve``); still unresolved while the store is not committed."""
        from heads import variant

        cfg = variant(self.variant, **dict(self.overrides))
        features = self.store_features()
        return cfg if features is None else cfg.resolve(features)

    def train_config(self):
        from pipeline.training.head import TrainConfig

        given = {"epochs": self.epochs, "lr": self.lr, "box_jitter": self.box_jitter}
        return TrainConfig(**{k: v for k, v in given.items() if v is not None})

    def run_dir(self) -> Path:
        cfg = self.head_config()
        # the store's name carries the backbone checkpoint's sha256 and the store's features the head's sizes; until
        # the backbone exists and the store is committed the run is pending (and cannot be complete), so the path then
        # names the upstream tasks instead
        store = self.store_url()
        pending = store is None or bool(cfg.unresolved)
        ident = {"head": cfg.to_dict(), "train": self.train_config().identity(),
                 "cache": ["pending", self.requires()["train"].task_id] if pending else store.name}
        return root() / "heads" / f"{cfg.slug}-{short_hash(ident)}" / f"seed-{self.seed}"

    def output(self):
        return luigi.LocalTarget(self.run_dir() / "metrics.json")

    def run(self):
        from pipeline.ava.splits import annotations
        from pipeline.training.head import train_head

        val = annotations(self.data().data_root(), "val")
        train_head(self.head_config(), self.store_url(), self.run_dir(), groundtruth=val["groundtruth"],
                   labelmap=val["labelmap"], exclusions=val["exclusions"], train=self.train_config(),
                   seed=self.seed, device=self.device)


class FullAblation(_CacheTask):
    """Table 1: every variant over several seeds -> ``<root>/ablation/table1.{md,csv,png}``.

    The table of a given set of runs is written to ``<root>/ablation/<hash>/`` (the task's output) and copied to
    ``<root>/ablation/`` as the latest.
    """

    seeds = luigi.ListParameter(default=[0, 1, 2])
    variants = luigi.ListParameter(default=list(ABLATION), description="head variants (default: heads.ABLATION)")
    epochs = luigi.OptionalIntParameter(default=None,
                                        description="head epochs of every run (default: [TrainHead] epochs, else TrainConfig's)")

    def requires(self):
        # clone() copies epochs=None over a [TrainHead] epochs of luigi.cfg; pass that setting on instead
        epochs = self.epochs if self.epochs is not None else TrainHead.epochs.task_value("TrainHead", "epochs")
        return [self.clone(TrainHead, variant=v, seed=s, epochs=epochs) for v in self.variants for s in self.seeds]

    def table_dir(self) -> Path:
        return ablation_dir() / short_hash([t.output().path for t in self.requires()])

    def output(self):
        return luigi.LocalTarget(self.table_dir() / "table1.md")

    def run(self):
        from pipeline.report import publish_ablation

        runs = [Path(t.output().path) for t in self.requires()]
        title = f"Table 1 on {'the mini-AVA' if self.dataset == 'mini' else 'AVA v2.2'} ({len(self.seeds)} seeds)"
        publish_ablation(runs, self.table_dir(), ablation_dir(), PAPER_MAP, list(self.variants), title)


def ablation_dir() -> Path:
    return root() / "ablation"
