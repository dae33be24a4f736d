"""The data in every identity: two AVA-layout folders with the same video ids and other content rerun what reads
the change and nothing else; a killed or failed run leaves nothing that looks complete."""

import csv
import shutil

import pandas as pd
import pytest

import tasks
from cache.store import CacheError
from pipeline.ava.files import AvaPaths

ABLATION = dict(dataset="ava", seeds=[0], variants=["st"], epochs=1, end_to_end="none")


@pytest.fixture
def ava_run(luigi_config, luigi_run, luigi_set, tiny_backbone, tmp_path):
    """Run the one-variant FullAblation on an AVA-layout folder; returns the families that ran."""
    luigi_set("FinetuneBackbone", "checkpoint", str(tiny_backbone))

    def run_on(folder):
        luigi_set("stctx", "ava_root", str(folder))
        return luigi_run(tasks.FullAblation(**ABLATION))
    return run_on


def _copy(tiny_ava, tmp_path, name):
    return shutil.copytree(tiny_ava, tmp_path / name)


def _rewrite(path, change):
    rows = list(csv.reader(path.read_text().splitlines()))
    path.write_text("".join(",".join(change(r)) + "\n" for r in rows))


def _table(root, *parts):
    return pd.read_csv(root.joinpath("ablation", "ava", *parts, "table1.csv"))


def test_new_val_labels_rerun_evaluation_not_extraction(ava_run, tiny_ava, tmp_path, luigi_config):
    a, b = _copy(tiny_ava, tmp_path, "a"), _copy(tiny_ava, tmp_path, "b")
    ids = sorted({r[6] for r in csv.reader(AvaPaths(a).groundtruth("val").read_text().splitlines())})
    _rewrite(AvaPaths(b).groundtruth("val"), lambda r: r[:6] + [ids[(ids.index(r[6]) + 1) % len(ids)]] + r[7:])

    first = ava_run(a)
    assert first.count("ExtractVideo") == 3 and first.count("TrainHead") == 1
    map_a = _table(luigi_config)["map_mean"].item()

    second = ava_run(b)
    # the val labels are not in the features: the store is kept (its manifests are committed again, as the new split
    # index is only found to give the same store once written), the head is trained and evaluated again
    assert "ExtractVideo" not in second
    assert sorted(set(second)) == ["FeatureCache", "FullAblation", "PrepareData", "SplitIndex", "TrainHead"]
    assert second.count("SplitIndex") == 1 and second.count("TrainHead") == 1
    map_b = _table(luigi_config)["map_mean"].item()
    assert map_b != map_a
    # each data has its own latest table; the dataset's latest is the last run's
    per_data = {p.parent.name: pd.read_csv(p)["map_mean"].item()
                for p in (luigi_config / "ablation" / "ava").glob("ava-*/table1.csv")}
    assert sorted(per_data.values()) == sorted([map_a, map_b])
    assert per_data[tasks.PrepareData(dataset="ava").data_id()] == map_b

    assert ava_run(a) == []  # back to the first folder: everything found done, nothing recomputed


def test_new_detector_boxes_or_frames_reextract(ava_run, tiny_ava, tmp_path):
    a, boxes, frames = (_copy(tiny_ava, tmp_path, n) for n in ("a", "boxes", "frames"))
    _rewrite(AvaPaths(boxes).detections("train"), lambda r: r[:6] + [r[6], f"{float(r[7]) * 0.5:.3f}"])
    one = sorted(AvaPaths(frames).frames.glob("*/*.jpg"))[5]
    one.write_bytes(one.read_bytes() + b"\0")

    ava_run(a)
    ran = ava_run(boxes)
    assert ran.count("ExtractVideo") == 3 and ran.count("TrainHead") == 1 and ran.count("SplitIndex") == 1
    ran = ava_run(frames)  # same annotation files: the split indexes are found; the frames make a new store
    assert "SplitIndex" not in ran and ran.count("ExtractVideo") == 3 and ran.count("TrainHead") == 1


def test_same_data_elsewhere_is_the_same_data(ava_run, tiny_ava, tmp_path):
    """Content, not paths: a copy of the folder under another name finds every result of the first."""
    ava_run(_copy(tiny_ava, tmp_path, "a"))
    assert ava_run(_copy(tiny_ava, tmp_path, "elsewhere")) == []


def test_a_chunk_lost_from_a_committed_store_stops_training(ava_run, tiny_ava, tmp_path, luigi_config, luigi_run):
    """A new head run on a store that lost a file refuses it, naming the video and the array."""
    ava_run(_copy(tiny_ava, tmp_path, "a"))
    (store,) = (luigi_config / "cache").glob("*.zarr")
    assert store.name.startswith("ava-mini-")  # the store is named after the data's dataset and the backbone
    lost = sorted((store / "videos").glob("*/slow/c/*/*/*/*"))[0]
    lost.unlink()
    video = lost.relative_to(store / "videos").parts[0]
    task = tasks.TrainHead(dataset="ava", variant="baseline", seed=5, epochs=1)
    assert all(t.complete() for t in task.requires().values())  # the store looks committed
    with pytest.raises(CacheError, match=f"video '{video}': array 'slow' misses"):
        task.run()
    assert not task.run_dir().exists()
