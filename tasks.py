"""Luigi tasks of stctx: parameters, dependencies and outputs; each ``run`` calls one library function.

    luigi --module tasks PrepareData          # the mini-AVA (or, with [stctx] dataset = ava, checks the AVA folder)

Every output lives under ``[stctx] root`` of luigi.cfg (default ``runs/``). Paths, devices and worker counts are
not significant parameters; output names are ``<readable slug>-<short hash>`` of the significant ones and of the
content of the data they depend on (``pipeline.ava.fingerprint``): new annotations, detector boxes or frames under
the same folder rerun exactly the tasks that read them.

What a run says: each task that ran ends with one line on stderr (what it made and where); Luigi's execution
summary follows (what ran, what was found done, what failed). Errors in the input (a file, a parameter, a store)
are one line, not a traceback; a failed or incomplete run exits non-zero (luigi.cfg ``[retcode]``).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import re
import sys
from pathlib import Path

import luigi

from cache.schema import COMPRESSORS, STORAGE_DTYPES, StorageConfig
from cache.store import CacheError, StoreUnreachableError, local_path, store_errors
from heads.config import ABLATION, PAPER_MAP, PUBLISHED, ZOO
from pipeline.ava import fingerprint
from pipeline.ava.files import SPLITS, AvaPaths, present_splits, read_labelmap
from pipeline.errors import InputError
from pipeline.outputs import OutputError, write_json

log = logging.getLogger("stctx")


class ParameterError(ValueError):
    """A task parameter that cannot work (an unknown variant, an override of no field, an unset path)."""


# Errors in what the user gave: reported as one line. Anything else is a bug and keeps its traceback.
USER_ERRORS = (InputError, OutputError, CacheError, ParameterError)


class _LuigiOutput(logging.Filter):
    """Luigi's own log as stctx users need it (installed on the ``luigi-interface`` logger).

    At ``log_level = INFO`` (luigi.cfg) only the execution summary of Luigi's INFO records passes, not its per-task
    chatter; ``DEBUG`` shows everything. A task failing with one of ``USER_ERRORS`` is one line, not a traceback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO and logging.getLogger("luigi-interface").getEffectiveLevel() == logging.INFO:
            return "Luigi Execution Summary" in str(record.msg)
        if record.exc_info and isinstance(record.exc_info[1], USER_ERRORS):
            task = record.args[-1] if isinstance(record.args, tuple) and record.args else "task"
            record.msg, record.args = "%s failed: %s", (task, record.exc_info[1])
            record.exc_info = record.exc_text = None
        elif record.levelno >= logging.WARNING and re.search(r"error in (complete|deps)\(\) method", str(record.msg)):
            head, _, tb = record.getMessage().partition("\n")
            last = tb.strip().splitlines()[-1] if tb.strip() else ""
            if last.partition(":")[0] in _user_error_names():
                record.msg, record.args = "%s %s", (re.sub(r" due to error in \w+\(\) method:", ":", head),
                                                    last.partition(": ")[2])
        return True


def _user_error_names() -> set[str]:
    """How a traceback's last line names ``USER_ERRORS`` and their subclasses (``cache.store.CacheError``, ...)."""
    names, todo = set(), list(USER_ERRORS)
    while todo:
        cls = todo.pop()
        names |= {cls.__name__, f"{cls.__module__}.{cls.__name__}"}
        todo += cls.__subclasses__()
    return names


class _DroppedSessions(logging.Filter):
    """aiohttp's "Unclosed client session" at the exit of a Luigi worker process that read an s3:// store: s3fs
    leaves its session to the garbage collector, harmless once the task has finished, and a line per task."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("Unclosed client session", "Unclosed connector"))


def _install_logging() -> None:
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _DroppedSessions) for f in asyncio_log.filters):
        asyncio_log.addFilter(_DroppedSessions())
    luigi_log = logging.getLogger("luigi-interface")
    if not any(isinstance(f, _LuigiOutput) for f in luigi_log.filters):
        luigi_log.addFilter(_LuigiOutput())
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


_install_logging()

_SCHEDULER_FLAGS = ("--scheduler-host", "--scheduler-port", "--scheduler-url", "--local-scheduler")
_SCHEDULER_OPTIONS = ("scheduler_host", "scheduler-host", "default-scheduler-host", "default_scheduler_host",
                      "scheduler_port", "scheduler-port", "default-scheduler-port", "default_scheduler_port",
                      "scheduler_url", "scheduler-url", "default-scheduler-url", "default_scheduler_url",
                      "local_scheduler", "local-scheduler")


def default_local_scheduler(argv: list[str], config=None) -> bool:
    """``luigi --module tasks X`` runs with the local scheduler unless a central one is named: ``--scheduler-host``,
    ``--scheduler-port`` or ``--scheduler-url`` on the command line, or a scheduler (or ``local_scheduler``) set in
    ``[core]`` of luigi.cfg. Luigi imports this module while parsing its command line, before it reads ``[core]``,
    so setting the option here decides. Returns whether the local scheduler was chosen."""
    config = config if config is not None else luigi.configuration.get_config()
    if any(arg.split("=", 1)[0] in _SCHEDULER_FLAGS for arg in argv) or any(
            config.has_option("core", option) for option in _SCHEDULER_OPTIONS):
        if "--local-scheduler" not in argv:
            _cluster_retcodes(config)
        return False
    config.set("core", "local_scheduler", "true")
    return True


def _cluster_retcodes(config) -> None:
    """With a central scheduler, tasks that other workers ran (Luigi's "run by other worker" and "not granted run
    permission") are how a team shares work, not a failure: they exit 0. Failed tasks (30), missing data (20) and
    scheduling errors (35) still exit non-zero; so does a second identical command on one host only with the local
    scheduler (with luigid it exits 0 and says "already running")."""
    if not config.has_section("retcode"):
        config.add_section("retcode")
    for option in ("already_running", "not_run"):
        config.set("retcode", option, "0")


if Path(sys.argv[0]).name == "luigi":  # the `luigi` command line; luigi.build() callers choose for themselves
    default_local_scheduler(sys.argv[1:])


@luigi.Task.event_handler(luigi.Event.SUCCESS)
def _result_line(task: luigi.Task) -> None:
    """One line per task that ran: what it made and where."""
    describe = getattr(task, "result_line", None)
    if describe is not None:
        try:
            log.info("%s", describe())
        except Exception as err:  # a report line must never turn a finished task into a failure
            log.info("%s done (no summary: %s)", task.task_family, err)


class stctx(luigi.Config):  # noqa: N801 - the section name of luigi.cfg
    root = luigi.Parameter(default="runs", description="folder that holds every output")
    dataset = luigi.ChoiceParameter(choices=["mini", "ava"], default="mini", description="mini-AVA or real AVA")
    ava_root = luigi.Parameter(default="data/ava", description="AVA v2.2 folder when dataset = ava")
    cache_url = luigi.Parameter(default="", description="where the feature stores live: a folder, file://PATH, "
                                "s3://BUCKET/PREFIX or another fsspec URL (default: <root>/cache)")
    local_cache = luigi.Parameter(default="", description="a local folder that keeps copies of a remote store's "
                                  "features for head training (cache.remote); unset: read the store directly")
    short_side = luigi.OptionalIntParameter(default=None, description="the backbone's input short side in pixels "
                                            "(default: the preset's, mini 90 and r50 256)")


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


def plain(value: object) -> dict:
    """A DictParameter's value as plain JSON data (Luigi freezes nested dicts and lists)."""
    return json.loads(luigi.DictParameter().serialize(value))


def root() -> Path:
    return Path(stctx().root)


def cache_url() -> str | Path:
    """``[stctx] cache_url``, or ``<root>/cache`` when it is not set. Stores are named by their content, so several
    roots (people, machines) that point at one cache URL share every store in it."""
    return stctx().cache_url or root() / "cache"


_REACHED: set[str] = set()


def check_cache_url() -> None:
    """Fail at scheduling, before any backbone is trained, when a remote ``cache_url`` does not answer (once per URL
    and process)."""
    url = cache_url()
    if local_path(url) is not None or url in _REACHED:
        return
    import fsspec

    with store_errors(url):
        fs, path = fsspec.core.url_to_fs(url)
        fs.exists(path)
    _REACHED.add(url)


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

    def ready(self) -> bool:
        """Whether the folder's files can be read: the mini-AVA once generated; an AVA folder always (it is the
        input; what it lacks, the check reports)."""
        return self.dataset == "ava" or (self.data_root() / ".complete").exists()

    def fingerprint(self) -> dict | None:
        """``pipeline.ava.fingerprint.dataset_fingerprint`` of the folder, None while the mini-AVA is not generated."""
        return fingerprint.dataset_fingerprint(self.data_root()) if self.ready() else None

    def data_id(self) -> str:
        """A readable name of the data: the mini-AVA's folder name (a hash of its generator), or ``ava-<hash of the
        folder's content>``; tables and stores of other data never share it."""
        if self.dataset == "mini":
            return self.data_root().name
        return f"ava-{fingerprint.digest(self.fingerprint())[:10]}"

    def output(self):
        if self.dataset == "ava":
            # the check is remembered per content of the folder, not per path: edits inside it check again
            return luigi.LocalTarget(root() / "data" / f"{self.data_id()}-check.json")
        return luigi.LocalTarget(self.data_root() / ".complete")

    def run(self):
        if self.dataset == "mini":
            from pipeline.mini.generator import generate_mini_ava

            generate_mini_ava(self.data_root(), **self.generator_args())
            return
        from pipeline.ava.check import check_ava

        folder = self.data_root()
        if not folder.is_dir():
            raise InputError(folder, None, "[stctx] ava_root: no such folder (set it in luigi.cfg or --stctx-ava-root)")
        report = check_ava(folder)
        if not report.ok:
            first = "; ".join(str(p) for p in report.errors[:3])
            raise InputError(folder, None, f"AVA folder check failed with {len(report.errors)} error(s) (all of them: "
                                           f"`stctx ava check {folder}`): {first}")
        write_json(self.output().path, {"fingerprint": self.fingerprint(), "report": report.to_dict()})

    def result_line(self) -> str:
        return f"PrepareData {self.dataset}: {self.data_root()} ({self.data_id()})"


# ----------------------------------------------------------------------------------------------- backbone

_SPEC_CACHE: dict[tuple, object] = {}
_SHA256: dict[tuple, str] = {}


def file_version(path: Path) -> tuple:
    """(resolved path, size, mtime): what the memos below are keyed by; a rewritten file is another version."""
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def cached_cache_spec(checkpoint: Path, extraction):
    """``pipeline.features.extract.cache_spec``, remembered per (file version, extraction): Luigi asks for outputs
    many times, and hashing a 270 MB checkpoint each time would make a finished pipeline slow to confirm.

    On one torch thread: this runs in the Luigi scheduler's own process, which forks a process for each task. Once
    torch has run a parallel region there (loading an r50 checkpoint does), the OpenMP thread pool exists in that
    process and not in its forked children, and a child's first parallel region waits forever for it. On one thread
    no pool is made; the count restored after it only tells each child's first parallel region to start its own."""
    from pipeline.features.extract import cache_spec
    from pipeline.features.runtime import torch_settings

    key = (*file_version(checkpoint), extraction)
    if key not in _SPEC_CACHE:
        with torch_settings(threads=1):
            _SPEC_CACHE[key] = cache_spec(checkpoint, extraction)
    return _SPEC_CACHE[key]


def cached_sha256(path: Path) -> str:
    """The file's sha256, remembered per file version: a task's identity names its init checkpoint by content, and
    Luigi asks for outputs many times."""
    from pipeline.features.checkpoints import file_sha256

    key = file_version(path)
    if key not in _SHA256:
        _SHA256[key] = file_sha256(path)
    return _SHA256[key]


def backbone_config(dataset: str):
    """The backbone of a dataset: the ``mini`` preset for the mini-AVA, ``r50`` (SlowFast R50 8x8) for AVA, at
    ``[stctx] short_side`` when it is set (a CPU dry run of the r50 path sets a small one)."""
    from pipeline.features.backbone import PRESETS

    cfg = PRESETS["mini" if dataset == "mini" else "r50"]
    side = stctx().short_side
    if side is None:
        return cfg
    if side < 16:
        raise ParameterError(f"[stctx] short_side {side}: expected at least 16 pixels (the backbone's output stride)")
    return dataclasses.replace(cfg, short_side=side)


class FinetuneBackbone(luigi.Task):
    """The SlowFast checkpoint that extraction uses: Table 1's baseline, SlowFast and the RoI baseline head trained end
    to end on frames of the training split (``pipeline.training.finetune``), or an AVA-fine-tuned detector imported.

    Where the weights come from:

    - ``init = PATH``: fine-tune from a checkpoint on disk, a Kinetics-400 SlowFast R50 8x8 in pytorchvideo's layout
      (``SLOWFAST_8x8_R50.pyth``) or PySlowFast's (``pipeline.features.checkpoints`` names every key that does not
      fit); the file's sha256 is part of the output's name.
    - ``checkpoint = PATH``: import an already AVA-fine-tuned detector (pytorchvideo's
      ``SLOWFAST_8x8_R50_DETECTION.pyth``, PySlowFast's, or ours) and train nothing: the backbone (and its head, where
      it has an 80-way projection) is written as our self-describing checkpoint, at ``[stctx] short_side`` when set.
    - neither: the mini-AVA trains the ``mini`` SlowFast from random weights; AVA needs one of the two.

    Output: ``<root>/backbone/<dataset>-<preset>-<hash>.pt`` (the checkpoint, written first) and ``.json`` beside it
    (the training or import record, written last: the task's output), both atomically. Training is resumable: its
    state is saved to ``<name>.state.pt`` every ``checkpoint_every`` steps and at each epoch end, and a rerun of the
    same command after a kill continues from there.
    """

    dataset = DatasetParameter()
    init = luigi.OptionalPathParameter(default=None, significant=False,
                                       description="fine-tune from this checkpoint (Kinetics-400 SlowFast R50 8x8)")
    checkpoint = luigi.OptionalPathParameter(default=None, significant=False,
                                             description="import this AVA-fine-tuned detector, train nothing")
    epochs = luigi.OptionalIntParameter(default=None, description="fine-tuning epochs (default: mini 4, AVA the recipe's)")
    batch_size = luigi.OptionalIntParameter(default=None, description="clips per step (default: the recipe's)")
    seed = luigi.IntParameter(default=0)
    checkpoint_every = luigi.IntParameter(default=200, significant=False,
                                          description="save the training state every this many steps (0: epoch ends)")
    device = luigi.OptionalParameter(default=None, significant=False)

    def requires(self):
        if self.checkpoint is not None:
            return []
        if self.dataset == "ava" and self.init is None:  # before the AVA folder is checked: nothing to train from
            raise ParameterError("dataset = ava needs [FinetuneBackbone] init = <Kinetics-400 SlowFast R50 checkpoint> "
                                 "(to fine-tune) or checkpoint = <AVA-fine-tuned detector> (to import) in luigi.cfg")
        if self.init is not None and not Path(self.init).is_file():
            raise InputError(self.init, None, "[FinetuneBackbone] init: no such file")
        return PrepareData(dataset=self.dataset)

    def config(self):
        return backbone_config(self.dataset)

    def identity(self) -> dict:
        """What the weights depend on: the backbone config and, for an import, the file's content; for training, the
        data, the init file's content, the recipe (``default_recipe``), the epochs, batch and seed."""
        from pipeline.training.recipe import default_recipe

        def content(given) -> str | list:  # a missing file is named (run() then refuses it)
            path = Path(given)
            return cached_sha256(path) if path.is_file() else ["missing", str(path)]

        cfg = self.config()
        if self.checkpoint is not None:
            return {"import": content(self.checkpoint), "backbone": cfg.to_dict()}
        return {"data": self.requires().data_id(), "backbone": cfg.to_dict(),
                "init": None if self.init is None else content(self.init), "epochs": self.epochs,
                "batch_size": self.batch_size, "seed": self.seed, "recipe": default_recipe(cfg).to_dict()}

    def checkpoint_path(self) -> Path:
        kind = "import" if self.checkpoint is not None else self.dataset
        return root() / "backbone" / f"{kind}-{self.config().name}-{short_hash(self.identity())}.pt"

    def output(self):
        return luigi.LocalTarget(self.checkpoint_path().with_suffix(".json"))

    def run(self):
        out = self.checkpoint_path()
        if self.checkpoint is not None:
            from pipeline.features.checkpoints import import_detector

            if not Path(self.checkpoint).is_file():
                raise InputError(self.checkpoint, None, "[FinetuneBackbone] checkpoint: no such file")
            record = import_detector(self.checkpoint, out, self.config(), short_side=stctx().short_side)
            write_json(self.output().path, record, default=str)
            return
        for name in ("epochs", "batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ParameterError(f"FinetuneBackbone --{name.replace('_', '-')} {getattr(self, name)}: "
                                     "expected at least 1")
        from pipeline.training.finetune import MINI_BACKBONE_EPOCHS, FinetuneConfig, finetune_on_ava

        given = {"epochs": self.epochs or (MINI_BACKBONE_EPOCHS if self.dataset == "mini" else None),
                 "batch_size": self.batch_size, "seed": self.seed, "checkpoint_every": self.checkpoint_every}
        run = FinetuneConfig(**{k: v for k, v in given.items() if v is not None})
        metrics = finetune_on_ava(self.requires().data_root(), out, self.config(), None, run, init=self.init,
                                  device=self.device, log=None, resume_path=out.with_suffix(".state.pt"))
        write_json(self.output().path, metrics, default=str)

    def result_line(self) -> str:
        if self.checkpoint is not None:
            return f"FinetuneBackbone {self.dataset}: imported {self.checkpoint} -> {self.checkpoint_path()}"
        record = json.loads(Path(self.output().path).read_text())
        return (f"FinetuneBackbone {self.dataset}: {len(record.get('train_loss', []))} epochs "
                f"({'from ' + str(self.init) if self.init else 'from random weights'}) -> {self.checkpoint_path()}")


# ----------------------------------------------------------------------------------------------- cache


class _CacheTask(luigi.Task):
    """Parameters shared by the extraction tasks: the dataset, the backbone and the extraction config.

    Downstream tasks pass them on with ``self.clone(...)``, which copies every parameter the two classes share.
    """

    dataset = DatasetParameter()
    threshold = luigi.FloatParameter(default=0.8, description="detector score for training proposals")
    eval_threshold = luigi.FloatParameter(default=0.8, description="detector score for evaluation proposals (val, test)")
    dtype = luigi.ChoiceParameter(choices=STORAGE_DTYPES, default=StorageConfig.dtype)
    compressor = luigi.ChoiceParameter(choices=COMPRESSORS, default=StorageConfig.compressor)
    device = luigi.OptionalParameter(default=None, significant=False)
    decode_workers = luigi.OptionalIntParameter(default=None, significant=False, description="frame decoding "
                                                "processes (default: the available cores on a GPU, none on a CPU)")

    def backbone(self) -> FinetuneBackbone:
        return FinetuneBackbone(dataset=self.dataset)

    def data(self) -> PrepareData:
        return PrepareData(dataset=self.dataset)

    def indexes(self) -> dict[str, SplitIndex]:
        """The index of every split of the dataset (``dataset_splits``): the store holds them all."""
        extraction = self.extraction()
        return {split: SplitIndex(dataset=self.dataset, split=split, threshold=extraction.split_threshold(split))
                for split in dataset_splits(self.dataset)}

    def extraction(self):
        from pipeline.features.extract import ExtractionConfig

        return ExtractionConfig(threshold=self.threshold, eval_threshold=self.eval_threshold, dtype=self.dtype,
                                compressor=self.compressor)

    def data_identity(self) -> dict | None:
        """What the store's features depend on in the data, by content: each split's index (proposals with their
        labels, keyframes, frame counts) and frames (``pipeline.ava.fingerprint.frames_digest``); None until every
        split index exists. Exclusions, the label map and the val labels are not in it: they change evaluation
        (``TrainHead``), not features."""
        indexes = self.indexes()
        if not all(index.complete() for index in indexes.values()):
            return None
        data_root = self.data().data_root()
        return {"dataset": self.dataset,
                **{split: {"index": cached_index_digest(index.folder()),
                           "frames": fingerprint.frames_digest(data_root, split)} for split, index in indexes.items()}}

    def spec(self):
        """The store's identity (backbone checkpoint, extraction config, data), or None while the backbone checkpoint
        or the split indexes do not exist yet."""
        backbone = self.backbone()
        data = self.data_identity()
        if data is None or not backbone.complete():
            return None
        spec = cached_cache_spec(backbone.checkpoint_path(), self.extraction())
        return dataclasses.replace(spec, extraction={"dataset": self.dataset, **spec.extraction, "data": data})

    def store_url(self) -> str | Path | None:
        """The store of ``spec()`` in ``cache_url()``: a Path on a local file system, else its URL."""
        from pipeline.features.extract import store_location

        spec = self.spec()
        return None if spec is None else store_location(cache_url(), spec)


_INDEX_DIGESTS: dict[tuple, str] = {}


def cached_index_digest(folder: Path) -> str:
    """``pipeline.ava.splits.index_digest``, remembered per folder and file times (an index is rewritten whole)."""
    from pipeline.ava.splits import index_digest

    key = (str(folder), *((folder / n).stat().st_mtime_ns for n in ("proposals.npz", "frames.json")))
    if key not in _INDEX_DIGESTS:
        _INDEX_DIGESTS[key] = index_digest(folder)
    return _INDEX_DIGESTS[key]


class StoreTarget(luigi.Target):
    """Complete when the store exists and the video group is complete (or, with ``split``, its manifest exists)."""

    def __init__(self, task: _CacheTask, video: str | None = None, split: str | None = None):
        self.task, self.video, self.split = task, video, split

    def exists(self) -> bool:
        from cache.store import FeatureStore

        url = self.task.store_url()
        if url is None or (isinstance(url, Path) and not url.exists()):
            return False
        try:
            store = FeatureStore.open(url, expect=self.task.spec())
        except StoreUnreachableError:
            raise  # "not complete" would send every worker to extract again
        except CacheError:
            return False
        return store.is_complete(self.video) if self.video is not None else store.manifest(self.split) is not None


# 2: evaluation proposals are detector boxes with score >= the threshold (1: every detector box)
SPLIT_INDEX_RULE = 2


class SplitIndex(luigi.Task):
    """A split's proposals, annotated keyframes and frame counts, read once for all its extraction tasks.

    Named by the content of the files it reads (ground truth, detector boxes, frame list), not by their folder."""

    dataset = DatasetParameter()
    split = luigi.ChoiceParameter(choices=SPLITS)
    threshold = luigi.FloatParameter(default=0.8, description="detector score of the split's proposals")

    def requires(self):
        return PrepareData(dataset=self.dataset)

    def inputs(self) -> dict | str:
        data = self.requires()
        if not data.ready():
            return ["pending", data.task_id]
        digests = fingerprint.split_fingerprint(data.data_root(), self.split, frames=False)
        return {k: digests[k] for k in ("groundtruth", "detections", "frame_list")}

    def folder(self) -> Path:
        # "rule": how the proposals are chosen; a new rule must never reuse an index made by the old one
        ident = {"data": self.requires().task_id, "inputs": self.inputs(), "rule": SPLIT_INDEX_RULE}
        return root() / "index" / f"{self.dataset}-{self.split}-t{self.threshold:g}-{short_hash(ident)}"

    def output(self):
        return luigi.LocalTarget(self.folder() / "proposals.npz")

    def run(self):
        from pipeline.ava.splits import write_split_index

        write_split_index(self.requires().data_root(), self.split, self.threshold, self.folder())

    def result_line(self) -> str:
        from pipeline.ava.splits import read_split_index

        proposals, keyframes, _ = read_split_index(self.folder())
        return (f"SplitIndex {self.dataset} {self.split}: {len(keyframes)} keyframes, {proposals.num_boxes} proposals "
                f"-> {self.folder()}")


class ExtractVideo(_CacheTask):
    """One video's features in the split's cache store (one Zarr group, its completion marker written last)."""

    split = luigi.ChoiceParameter(choices=SPLITS)
    video = luigi.Parameter()

    def requires(self):
        return [self.data(), self.backbone(), *self.indexes().values()]

    def output(self):
        return StoreTarget(self, video=self.video)

    def run(self):
        from pipeline.features.extract import extract_split_video

        extract_split_video(self.data().data_root(), self.split, self.video, self.backbone().checkpoint_path(),
                            self.store_url(), self.spec(), self.extraction(), device=self.device,
                            num_workers=self.decode_workers, index=self.indexes()[self.split].folder())

    def result_line(self) -> str:
        return f"ExtractVideo {self.split} {self.video} -> {self.store_url()}"


class FeatureCache(_CacheTask):
    """Every video of a split extracted, then the split's manifest committed (written last)."""

    split = luigi.ChoiceParameter(choices=SPLITS, default="val")

    def requires(self):
        """The videos' ExtractVideo tasks too once the split's index exists, so that the scheduler hands them out to
        every worker (with luigid, several machines); before that they are yielded from ``run``. Decided once per
        task object: Luigi checks ``requires`` again just before ``run`` and fails a task whose requirements grew."""
        prereqs = [self.data(), self.backbone(), *self.indexes().values()]
        if getattr(self, "_static_extractions", None) is None:
            check_cache_url()
            self._static_extractions = all(t.complete() for t in prereqs)
        return prereqs + (self.extractions() if self._static_extractions else [])

    def extractions(self) -> list:
        """One ExtractVideo per video of the split's index, read once per task object (``requires`` is asked often
        and the index, named by its content, does not change under it)."""
        if getattr(self, "_extractions", None) is None:
            from pipeline.ava.splits import read_split_index

            _, keyframes, _ = read_split_index(self.indexes()[self.split].folder())
            self._extractions = [self.clone(ExtractVideo, video=v) for v in sorted({v for v, _ in keyframes})]
        return self._extractions

    def output(self):
        return StoreTarget(self, split=self.split)

    def run(self):
        from pipeline.features.extract import commit_split

        if self.output().exists():
            # committed by another root or worker since this run was scheduled (its data was not indexed yet then):
            # the same store name means the same videos, so there is nothing to write
            self._found_committed = True
            return
        extractions = self.extractions()
        yield extractions
        commit_split(self.store_url(), self.spec(), self.split, [t.video for t in extractions])

    def result_line(self) -> str:
        done = "found committed (nothing written)" if getattr(self, "_found_committed", False) else "committed"
        return f"FeatureCache {self.dataset} {self.split}: {done} in {self.store_url()}"


# ----------------------------------------------------------------------------------------------- heads


class FeatureBank(_CacheTask):
    """The long-term feature bank of a split (``cache.bank``), built once from its committed features: per keyframe
    the pooled actor features of its best boxes, read by heads whose config needs ``bank`` (``lfb``).

    Output: ``<root>/bank/<store name>-<split>-<hash>.npz``, the hash of the bank's parameters and version
    (``cache.bank.bank_identity``); the store's name carries the backbone, the extraction and the data, so the bank
    is content-addressed like the store.
    """

    split = luigi.ChoiceParameter(choices=SPLITS, default="train")

    def requires(self):
        return self.clone(FeatureCache, split=self.split)

    def output(self):
        from cache.bank import bank_identity

        store = self.spec().name if self.store_url() is not None else f"pending-{self.requires().task_id}"
        return luigi.LocalTarget(root() / "bank" / f"{store}-{self.split}-{short_hash(bank_identity())}.npz")

    def run(self):
        from cache.bank import build_bank

        store = self.store_url()
        with store_errors(store):
            build_bank(store, self.split, local_cache=stctx().local_cache or None).save(self.output().path)

    def result_line(self) -> str:
        return f"FeatureBank {self.split}: -> {self.output().path}"


class TrainHead(_CacheTask):
    """One Table 1 variant trained from the cache with one seed, evaluated on the validation split.

    Output: ``<root>/heads/<variant>-<hash>/seed-<k>/metrics.json`` and ``head.pt`` (the folder appears whole, when
    the run has finished). The hash covers the head config (the registry entry plus overrides, at the sizes the store
    records), the training config, the feature store's name (backbone checkpoint, extraction config and the data the
    features come from) and the content of the evaluation files (val ground truth, exclusions, label map): a new
    backbone or new data retrains every head, an edit of one variant's config reruns that variant only.
    """

    # Luigi starts the runnable task of highest priority first, and a task's priority is at least that of any task
    # that needs it: the heads (and what they need) go before FinetuneEndToEnd (priority 0), which would otherwise
    # start as soon as its own head is done and share the two cores with every head still to train
    priority = 10

    variant = luigi.Parameter(default="st-sa")
    seed = luigi.IntParameter(default=0)
    overrides = luigi.DictParameter(default={}, description="HeadConfig field overrides, e.g. {\"width\": 64}")
    epochs = luigi.OptionalIntParameter(default=None, description="default: TrainConfig's")
    lr = luigi.OptionalFloatParameter(default=None)
    box_jitter = luigi.FloatParameter(default=0.0)

    def requires(self):
        needs = {split: self.clone(FeatureCache, split=split) for split in ("train", "val")}
        if self.reads_bank():
            needs |= {f"bank-{split}": self.clone(FeatureBank, split=split) for split in ("train", "val")}
        return needs

    def reads_bank(self) -> bool:
        """Whether the variant reads a long-term feature bank (``FeatureBank``), from the registry entry."""
        from heads import VARIANTS

        return self.variant in VARIANTS and "bank" in VARIANTS[self.variant].needs

    def banks(self, splits) -> dict[str, str] | None:
        return {split: self.clone(FeatureBank, split=split).output().path for split in splits} \
            if self.reads_bank() else None

    def store_features(self) -> dict | None:
        """What the store records of its features (``pipeline.training.head.feature_spec``), None until both splits
        are committed; read once per store."""
        from cache.store import FeatureStore
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
        from heads import HeadConfig, variant

        fields = [f.name for f in dataclasses.fields(HeadConfig)]
        for name in sorted(set(self.overrides) - set(fields)):
            near = difflib.get_close_matches(name, fields, n=1)
            raise ParameterError(f"TrainHead --overrides {json.dumps(plain(self.overrides))}: no HeadConfig field "
                                 f"{name}" + (f" (did you mean {near[0]}?)" if near else " (see heads/config.py)"))
        try:
            cfg = variant(self.variant, **dict(self.overrides))
        except KeyError as err:
            raise ParameterError(f"TrainHead --variant {self.variant}: {err.args[0]}") from None
        except (TypeError, ValueError) as err:
            raise ParameterError(f"TrainHead --variant {self.variant} --overrides "
                                 f"{json.dumps(plain(self.overrides))}: {err}") from None
        features = self.store_features()
        return cfg if features is None else cfg.resolve(features)

    def train_config(self):
        from pipeline.training.head import TrainConfig

        given = {"epochs": self.epochs, "lr": self.lr, "box_jitter": self.box_jitter}
        try:
            return TrainConfig(**{k: v for k, v in given.items() if v is not None})
        except (TypeError, ValueError) as err:
            raise ParameterError(f"TrainHead: {err}") from None

    def eval_inputs(self, split: str = "val") -> dict | list:
        """Digests of a split's evaluation files (ground truth, exclusions, label map)."""
        data = self.data()
        if not data.ready():
            return ["pending", data.task_id]
        digests = fingerprint.split_fingerprint(data.data_root(), split, frames=False)
        return {"groundtruth": digests["groundtruth"], "exclusions": digests["exclusions"],
                "labelmap": fingerprint.file_digest(AvaPaths(data.data_root()).labelmap)}

    def run_dir(self) -> Path:
        cfg = self.head_config()
        # the store's name carries the backbone checkpoint's sha256 and the data, and the store's features the head's
        # sizes; until the backbone exists and the store is committed the run is pending (and cannot be complete), so
        # the path then names the upstream tasks instead
        store = self.store_url()
        pending = store is None or bool(cfg.unresolved)
        ident = {"head": cfg.to_dict(), "train": self.train_config().identity(),
                 "cache": ["pending", self.requires()["train"].task_id] if pending else f"{self.spec().name}.zarr",
                 "eval": self.eval_inputs()}
        if self.reads_bank():
            from cache.bank import bank_identity

            ident["bank"] = bank_identity()
        return root() / "heads" / f"{cfg.slug}-{short_hash(ident)}" / f"seed-{self.seed}"

    def output(self):
        return luigi.LocalTarget(self.run_dir() / "metrics.json")

    def run(self):
        from pipeline.ava.splits import annotations
        from pipeline.training.head import train_head

        val = annotations(self.data().data_root(), "val")
        store = self.store_url()
        with store_errors(store):
            train_head(self.head_config(), store, self.run_dir(), groundtruth=val["groundtruth"],
                       labelmap=val["labelmap"], exclusions=val["exclusions"], train=self.train_config(),
                       seed=self.seed, device=self.device, local_cache=stctx().local_cache or None,
                       banks=self.banks(("train", "val")))

    def label(self) -> str:
        """The run's name in tables: the variant, with its overrides when there are any."""
        extra = ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(plain(self.overrides).items()))
        return f"{self.variant} ({extra})" if extra else self.variant

    def result_line(self) -> str:
        metrics = json.loads(Path(self.output().path).read_text())
        return (f"TrainHead {self.label()} seed {self.seed}: frame-mAP {100 * metrics['mAP']:.2f} "
                f"-> {self.run_dir()}")


class EvaluateHead(TrainHead):
    """A trained head (``TrainHead``'s run, the same parameters) evaluated on the stored proposals of another split.

    Output: ``<TrainHead's run dir>/eval-<split>-<hash>.json``, the hash of that split's evaluation files (ground
    truth, exclusions, label map): the same metrics as ``metrics.json`` (``mAP``, ``per_class``, ...) and ``split``.
    The head is never trained on, or chosen by, this split: FullAblation reports the mini-AVA's ``test`` split this
    way, while every default was chosen on ``val``.
    """

    split = luigi.ChoiceParameter(choices=SPLITS, default="test")

    def trained(self) -> TrainHead:
        return self.clone(TrainHead)

    def requires(self):
        needs = {"head": self.trained(), "features": self.clone(FeatureCache, split=self.split)}
        if self.reads_bank():
            needs["bank"] = self.clone(FeatureBank, split=self.split)
        return needs

    def output(self):
        name = f"eval-{self.split}-{short_hash(self.eval_inputs(self.split))}.json"
        return luigi.LocalTarget(self.trained().run_dir() / name)

    def run(self):
        from pipeline.ava.splits import annotations
        from pipeline.features.runtime import resolve_device
        from pipeline.training.head import check_groundtruth, evaluate_head, load_head

        files = annotations(self.data().data_root(), self.split)
        check_groundtruth(files["groundtruth"], files["labelmap"], files["exclusions"], self.split)
        device = resolve_device(self.device)
        head_file = self.trained().run_dir() / "head.pt"
        model, ckpt = load_head(head_file, device)
        store = self.store_url()
        with store_errors(store):
            result, seconds = evaluate_head(model, store, self.split, groundtruth=files["groundtruth"],
                                            labelmap=files["labelmap"], exclusions=files["exclusions"],
                                            device=device, local_cache=stctx().local_cache or None,
                                            bank=(self.banks([self.split]) or {}).get(self.split))
        write_json(self.output().path, {
            "variant": ckpt["variant"], "seed": ckpt["seed"], "split": self.split, "mAP": result.mAP,
            "per_class": {str(k): v for k, v in result.per_class.items()},
            "category_mAP": getattr(result, "category_mAP", None),
            "num_gt": {str(k): v for k, v in getattr(result, "num_gt", {}).items()},
            "eval_time_s": seconds, "head": str(head_file), "val_mAP": ckpt["mAP"]})

    def result_line(self) -> str:
        metrics = json.loads(Path(self.output().path).read_text())
        return (f"EvaluateHead {self.label()} seed {self.seed} on {self.split}: frame-mAP {100 * metrics['mAP']:.2f} "
                f"-> {self.output().path}")


class FinetuneEndToEnd(_CacheTask):
    """The final model: backbone and context head trained jointly on frames, from FinetuneBackbone's checkpoint and
    TrainHead's head (``pipeline.training.end_to_end``), with the fine-tuning loop, recipe and resume of the backbone
    step, then evaluated on frames: on ``val`` (what its settings are chosen by) and, for the mini-AVA, on the held-out
    ``test`` (``report_split``).

    Output: ``<root>/end_to_end/<variant>-<hash>/seed-<k>/metrics.json`` (written last) beside ``model.pt`` (both
    configs and both weights, ``load_end_to_end``); the hash covers the head run it starts from (which names the
    backbone, the features and the head), the fine-tuning settings and the evaluation files. The metrics have the
    fields of EvaluateHead's (``variant`` reads "<variant> (end to end)", ``mAP`` on the reported split, ``val_mAP``)
    and ``start_val_mAP``, the same model's val mAP on frames before any update.
    """

    variant = luigi.Parameter(default="st-sa")
    seed = luigi.IntParameter(default=0)
    overrides = luigi.DictParameter(default={}, description="HeadConfig overrides of the head it starts from")
    head_epochs = luigi.OptionalIntParameter(default=None, description="epochs of the TrainHead run it starts from")
    epochs = luigi.IntParameter(default=1, description="end-to-end fine-tuning epochs")
    batch_size = luigi.OptionalIntParameter(default=None, description="clips per step (default: the recipe's)")
    lr_scale = luigi.FloatParameter(default=0.1, description="the recipe's learning rate times this (both parts start "
                                    "trained)")
    checkpoint_every = luigi.IntParameter(default=200, significant=False)

    def head_run(self) -> TrainHead:
        epochs = head_epochs(self.head_epochs)
        return self.clone(TrainHead, variant=self.variant, seed=self.seed, overrides=self.overrides, epochs=epochs)

    def requires(self):
        return {"backbone": self.backbone(), "head": self.head_run(), "data": self.data()}

    def splits(self) -> list[str]:
        return list(dict.fromkeys(["val", report_split(self.dataset)]))

    def run_dir(self) -> Path:
        head = self.head_run()
        ident = {"head": str(head.run_dir().relative_to(root())), "epochs": self.epochs, "batch_size": self.batch_size,
                 "lr_scale": self.lr_scale, "eval": {s: head.eval_inputs(s) for s in self.splits()},
                 "eval_threshold": self.eval_threshold}
        return root() / "end_to_end" / f"{self.variant}-{short_hash(ident)}" / f"seed-{self.seed}"

    def output(self):
        return luigi.LocalTarget(self.run_dir() / "metrics.json")

    def label(self) -> str:
        return f"{self.head_run().label()} (end to end)"

    def run(self):
        from pipeline.training.end_to_end import build_end_to_end, evaluate_on_frames, finetune_end_to_end

        if self.head_run().reads_bank():
            raise ParameterError(f"FinetuneEndToEnd --variant {self.variant}: the head reads a long-term feature bank, "
                                 "which the end-to-end model does not build from frames")
        if self.epochs < 1:
            raise ParameterError(f"FinetuneEndToEnd --epochs {self.epochs}: expected at least 1")
        if not self.lr_scale > 0:
            raise ParameterError(f"FinetuneEndToEnd --lr-scale {self.lr_scale}: expected > 0")
        data_root = self.data().data_root()
        out = self.run_dir()
        out.mkdir(parents=True, exist_ok=True)
        head_file = self.head_run().run_dir() / "head.pt"
        backbone_file = self.backbone().checkpoint_path()
        model = build_end_to_end(backbone_file, head_file, device="cpu")
        evaluate = lambda split: evaluate_on_frames(model, data_root, split, threshold=self.eval_threshold,  # noqa: E731
                                                    device=self.device)[0]
        start = evaluate("val")
        train = finetune_end_to_end(model, data_root, out / "model.pt", epochs=self.epochs, batch_size=self.batch_size,
                                    lr_scale=self.lr_scale, seed=self.seed, checkpoint_every=self.checkpoint_every,
                                    device=self.device, resume_path=out.parent / f"seed-{self.seed}.state.pt",
                                    start={"backbone": cached_sha256(backbone_file), "head": cached_sha256(head_file)},
                                    meta={"head": str(head_file), "backbone": str(backbone_file),
                                          "data_root": str(data_root), "labelmap": read_labelmap(
                                              AvaPaths(data_root).labelmap)})
        results = {split: evaluate(split) for split in self.splits()}
        report = results[report_split(self.dataset)]
        write_json(self.output().path, {
            "variant": self.label(), "seed": self.seed, "split": report_split(self.dataset), "mAP": report.mAP,
            "per_class": {str(k): v for k, v in report.per_class.items()},
            "val_mAP": results["val"].mAP, "start_val_mAP": start.mAP, "model": str(out / "model.pt"),
            "head": str(head_file), "train": train}, default=str)

    def result_line(self) -> str:
        metrics = json.loads(Path(self.output().path).read_text())
        return (f"FinetuneEndToEnd {self.label()} seed {self.seed}: frame-mAP {metrics['split']} "
                f"{100 * metrics['mAP']:.2f} (val {100 * metrics['val_mAP']:.2f}, before fine-tuning "
                f"{100 * metrics['start_val_mAP']:.2f}) -> {self.run_dir()}")


class Predict(_CacheTask):
    """The final model's predictions of a split, made once: ``stctx predict --split`` as a task
    (``pipeline.predict.run.predict``) with FinetuneEndToEnd's model of ``variant`` and ``seed``.

    Output: ``<root>/predict/<variant>-<hash>/<split>/summary.json`` (written last) beside ``predictions.csv`` (AVA
    layout), ``metrics.json`` and ``per_class_ap.png`` (the split's ground truth), ``contact_sheet.png`` and
    ``videos/<id>.mp4`` (the first ``annotated_videos`` videos); the hash covers the end-to-end run (which names its
    backbone, head, settings and data) and the box threshold.
    """

    variant = luigi.Parameter(default="st-sa")
    seed = luigi.IntParameter(default=0)
    split = luigi.Parameter(default="val")
    overrides = luigi.DictParameter(default={}, description="HeadConfig overrides of the model's head")
    head_epochs = luigi.OptionalIntParameter(default=None, description="epochs of the TrainHead run the model starts "
                                             "from")
    annotated_videos = luigi.IntParameter(default=1, description="annotated MP4s (the first videos of the split)")

    def model_run(self) -> FinetuneEndToEnd:
        e2e_epochs = FinetuneEndToEnd.epochs.task_value("FinetuneEndToEnd", "epochs")
        return self.clone(FinetuneEndToEnd, variant=self.variant, seed=self.seed, epochs=e2e_epochs)

    def requires(self):
        return {"model": self.model_run(), "data": self.data()}

    def run_dir(self) -> Path:
        model = self.model_run().run_dir()
        ident = {"model": str(model.relative_to(root())), "threshold": self.eval_threshold,
                 "videos": self.annotated_videos}
        return root() / "predict" / f"{self.variant}-{short_hash(ident)}" / self.split

    def output(self):
        return luigi.LocalTarget(self.run_dir() / "summary.json")

    def run(self):
        from pipeline.predict.run import predict

        if self.split not in dataset_splits(self.dataset):
            raise ParameterError(f"Predict --split {self.split}: expected one of {', '.join(dataset_splits(self.dataset))}")
        predict(self.run_dir(), split=self.split, data_root=self.data().data_root(),
                model=self.model_run().run_dir() / "model.pt", threshold=self.eval_threshold,
                device=self.device, videos=self.annotated_videos, progress=False)

    def result_line(self) -> str:
        summary = json.loads(Path(self.output().path).read_text())
        mAP = f", frame-mAP {100 * summary['mAP']:.2f}" if summary.get("mAP") is not None else ""
        return (f"Predict {self.variant} seed {self.seed} on {self.split}: {summary['boxes_predicted']} boxes{mAP} -> "
                f"{self.run_dir()}")


class FullAblation(_CacheTask):
    """Table 1: every variant over several seeds -> ``<root>/ablation/<dataset>/table1.{md,csv,png}``.

    On the split of ``report_split``: the mini-AVA's held-out ``test`` (``EvaluateHead`` of each run; every default
    was chosen on ``val``), AVA's ``val`` as in the paper (``TrainHead``'s own evaluation).

    The table of a given set of runs is written to ``<root>/ablation/<dataset>/<data id>/<hash>/`` (the task's
    output) and copied to ``<root>/ablation/<dataset>/<data id>/`` (the latest of that data) and
    ``<root>/ablation/<dataset>/`` (the latest of that dataset). ``overrides``: HeadConfig fields for every variant
    (``{"width": 64}``) or per variant (``{"st-sa": {"width": 64}}``); overridden rows are named so in the table.
    The last row is the final model, a variant trained end to end (``FinetuneEndToEnd``, seeds ``end_to_end_seeds``)
    from its heads of those seeds, named "<variant> (end to end)": ``end_to_end``, by default the last of
    ``variants`` (st-sa); "none" leaves the row out.
    """

    seeds = luigi.ListParameter(default=[0, 1, 2])
    variants = luigi.ListParameter(default=list(ABLATION), description="head variants (default: heads.ABLATION)")
    epochs = luigi.OptionalIntParameter(default=None,
                                        description="head epochs of every run (default: [TrainHead] epochs, else TrainConfig's)")
    overrides = luigi.DictParameter(default={}, description='HeadConfig overrides: {"width": 64} or {"st-sa": {...}}')
    end_to_end = luigi.Parameter(default="last", description="the variant of the last row, the final model trained "
                                 "end to end (FinetuneEndToEnd): a variant, 'last' (the last of --variants) or 'none'")
    end_to_end_seeds = luigi.ListParameter(default=[0], description="seeds of the end-to-end row")

    def overrides_of(self, name: str) -> dict:
        given = plain(self.overrides)
        per_variant = {k for k in given if k in self.variants}
        if per_variant and len(per_variant) != len(given):
            raise ParameterError(f"FullAblation --overrides {json.dumps(given)}: give fields for every variant or a "
                                 f"mapping from variant names ({', '.join(self.variants)}), not both")
        if per_variant:
            for k in per_variant:
                if not isinstance(given[k], dict):
                    raise ParameterError(f"FullAblation --overrides: {k!r} must map to a dict of HeadConfig fields")
            return dict(given.get(name, {}))
        return given

    def requires(self):
        epochs = head_epochs(self.epochs)
        rows = head_rows(self, self.variants, self.seeds, epochs, self.overrides_of)
        final = self.final_variant()
        if final is None:
            return rows
        # clone() would copy this task's (head) epochs over the end-to-end epochs: pass the end-to-end setting on
        e2e_epochs = FinetuneEndToEnd.epochs.task_value("FinetuneEndToEnd", "epochs")
        return rows + [self.clone(FinetuneEndToEnd, variant=final, seed=s, head_epochs=epochs, epochs=e2e_epochs,
                                  overrides=self.overrides_of(final)) for s in self.end_to_end_seeds]

    def final_variant(self) -> str | None:
        """The variant of the end-to-end row: ``end_to_end`` ("last": the last of ``variants``, st-sa by default;
        "none": no such row)."""
        if self.end_to_end == "none" or not self.variants:
            return None
        name = self.variants[-1] if self.end_to_end == "last" else self.end_to_end
        if name not in self.variants:
            raise ParameterError(f"FullAblation --end-to-end {name}: not one of --variants ({', '.join(self.variants)});"
                                 " the final model starts from that variant's heads ('none': no end-to-end row)")
        return name

    def latest_dir(self) -> Path:
        return ablation_dir() / self.dataset

    def table_dir(self) -> Path:
        return self.latest_dir() / self.data().data_id() / short_hash([t.output().path for t in self.requires()])

    def output(self):
        return luigi.LocalTarget(self.table_dir() / "table1.md")

    def run(self):
        from pipeline.report import publish_ablation

        runs = self.requires()
        labels = {Path(t.output().path): t.label() for t in runs}
        order = list(dict.fromkeys(t.label() for t in runs))
        title = (f"Table 1 on {'the mini-AVA' if self.dataset == 'mini' else 'AVA v2.2'} {report_split(self.dataset)} "
                 f"({len(self.seeds)} seeds, detector boxes with score >= {self.eval_threshold:g})")
        out = self.table_dir()
        publish_ablation(list(labels), out, [out.parent, self.latest_dir()], PAPER_MAP, order, title, labels=labels,
                         blind=self.direction_blind())

    def direction_blind(self) -> dict[int, float] | None:
        """The direction-blind AP (percent, mean of ``BLIND_DRAWS`` draws) of each class of the dataset's order pairs
        on the proposals of the reported split (``pipeline.ava.bounds``); None for a dataset without them or a split
        without their ground truth."""
        pairs = order_pairs(self.dataset)
        if not pairs:
            return None
        from pipeline.ava.bounds import direction_blind_ap
        from pipeline.ava.splits import annotations, read_split_index

        split = report_split(self.dataset)
        proposals, _, _ = read_split_index(self.indexes()[split].folder())
        files = annotations(self.data().data_root(), split)
        aps = direction_blind_ap(proposals, files["groundtruth"], files["labelmap"], files["exclusions"], pairs,
                                 draws=BLIND_DRAWS)
        return {c: 100.0 * sum(v) / len(v) for c, v in aps.items()} or None

    def result_line(self) -> str:
        return (f"FullAblation {self.dataset}: Table 1 of {len(self.requires())} runs -> "
                f"{self.latest_dir() / 'table1.md'} (this data: {self.table_dir().parent / 'table1.md'})")


class ContextZoo(_CacheTask):
    """The context heads of the field on one cache: Table 1's variants and the zoo's (``heads.config.ZOO``: ACRN,
    ACAR-Net's HR2O) over several seeds -> ``<root>/zoo/table.{md,csv,png}``.

    The runs are TrainHead's (and, for the mini-AVA, EvaluateHead's on ``test``), so the variants FullAblation has
    trained are found done and only the new heads train. The table has ``variant, split, map_mean, map_std, n_seeds,
    train_s`` (head training seconds per run), the val mAP they were chosen by, the order classes beside the
    direction-blind bound (mini-AVA), and each head's published AVA number with its source (``heads.config.PUBLISHED``)
    in columns of their own. Written to ``<root>/zoo/<data id>/<hash>/`` and copied to ``<root>/zoo/<data id>/`` and
    ``<root>/zoo/``.
    """

    seeds = luigi.ListParameter(default=[0, 1, 2])
    variants = luigi.ListParameter(default=list(ZOO), description="head variants (default: heads.ZOO)")
    epochs = luigi.OptionalIntParameter(default=None,
                                        description="head epochs of every run (default: [TrainHead] epochs, else TrainConfig's)")

    def requires(self):
        return head_rows(self, self.variants, self.seeds, head_epochs(self.epochs), lambda variant: {})

    def latest_dir(self) -> Path:
        return root() / "zoo"

    def table_dir(self) -> Path:
        return self.latest_dir() / self.data().data_id() / short_hash([t.output().path for t in self.requires()])

    def output(self):
        return luigi.LocalTarget(self.table_dir() / "table.md")

    def run(self):
        from pipeline.report import publish_zoo

        results = []
        for task in self.requires():
            result = json.loads(Path(task.output().path).read_text())
            trained = task.trained() if isinstance(task, EvaluateHead) else task
            result["train_time_s"] = json.loads(Path(trained.output().path).read_text()).get("train_time_s")
            results.append(result)
        title = (f"Context heads on one cache, {'the mini-AVA' if self.dataset == 'mini' else 'AVA v2.2'} "
                 f"{report_split(self.dataset)} ({len(self.seeds)} seeds, detector boxes with score >= "
                 f"{self.eval_threshold:g})")
        out = self.table_dir()
        publish_zoo(results, out, [out.parent, self.latest_dir()], PUBLISHED, list(self.variants), title,
                    blind=self.clone(FullAblation).direction_blind())

    def result_line(self) -> str:
        return (f"ContextZoo {self.dataset}: {len(self.variants)} heads x {len(self.seeds)} seeds -> "
                f"{self.latest_dir() / 'table.md'}")


def head_epochs(epochs: int | None) -> int | None:
    """The head epochs a table's runs get: the table's own, else ``[TrainHead] epochs`` of luigi.cfg (``clone()``
    would copy a None over that setting)."""
    return epochs if epochs is not None else TrainHead.epochs.task_value("TrainHead", "epochs")


def head_rows(table: luigi.Task, variants, seeds, epochs: int | None, overrides_of) -> list:
    """A table's head runs, one per variant and seed (``overrides_of(variant)``: its HeadConfig overrides): TrainHead
    where the dataset reports ``val`` (its own evaluation), else EvaluateHead on the reported split."""
    split = report_split(table.dataset)
    runs = [table.clone(TrainHead, variant=v, seed=s, epochs=epochs, overrides=overrides_of(v))
            for v in variants for s in seeds]
    return runs if split == "val" else [run.clone(EvaluateHead, split=split) for run in runs]


BLIND_DRAWS = 20  # the bound's spread over draws is about 2.4 AP on the mini-AVA val split; the mean's, 0.5


def dataset_splits(dataset: str) -> tuple[str, ...]:
    """The splits of a dataset, all held by its feature store: the mini-AVA's train, val and test; an AVA folder's
    train and val, and test when the folder has one (``pipeline.ava.files.present_splits``)."""
    return SPLITS if dataset == "mini" else present_splits(stctx().ava_root)


def report_split(dataset: str) -> str:
    """The split Table 1 reports: the mini-AVA's held-out ``test``; AVA's ``val``, as the paper (AVA's test labels are
    not public)."""
    return "test" if dataset == "mini" else "val"


def order_pairs(dataset: str) -> tuple[tuple[int, int], ...]:
    """Pairs of classes that differ only in the order of events: the mini-AVA's give/take; none declared for AVA."""
    if dataset != "mini":
        return ()
    from pipeline.mini.generator import ORDER_PAIRS

    return ORDER_PAIRS


def ablation_dir() -> Path:
    return root() / "ablation"
