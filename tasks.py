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


class stctx(luigi.Config):  # noqa: N801 - the section name of luigi.cfg
    root = luigi.Parameter(default="runs", description="folder that holds every output")
    dataset = luigi.ChoiceParameter(choices=["mini", "ava"], default="mini", description="mini-AVA or real AVA")
    ava_root = luigi.Parameter(default="data/ava", description="AVA v2.2 folder when dataset = ava")


def DatasetParameter():  # noqa: N802 - reads like a parameter class
    """``mini`` or ``ava``; defaults to ``[stctx] dataset`` of luigi.cfg."""
    return luigi.ChoiceParameter(choices=["mini", "ava"], default="mini",
                                 config_path={"section": "stctx", "name": "dataset"},
                                 description="mini-AVA or real AVA (default: [stctx] dataset)")


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

    def data_root(self) -> Path:
        if self.dataset == "ava":
            return Path(stctx().ava_root)
        return root() / "data" / f"mini-{short_hash(self.generator_args())}"

    def output(self):
        if self.dataset == "ava":
            return luigi.LocalTarget(root() / "data" / f"ava-check-{short_hash(str(self.data_root().resolve()))}.json")
        return luigi.LocalTarget(self.data_root() / ".complete")

    def run(self):
        if self.dataset == "mini":
            from pipeline.mini_ava import generate_mini_ava

            generate_mini_ava(self.data_root(), **self.generator_args())
            return
        from pipeline.check import check_ava

        report = check_ava(self.data_root())
        if not report.ok:
            raise RuntimeError(f"AVA folder check failed:\n{report.format()}")
        with self.output().temporary_path() as tmp:
            Path(tmp).write_text(json.dumps(report.to_dict(), indent=1))
