"""`stctx ava frames`: frame timing of the decode, resumability, frame lists."""

import numpy as np
import pytest
from PIL import Image

from pipeline.ava import files as ava
from pipeline.ava import frames

av = pytest.importorskip("av")

SOURCE_FPS = 10


def make_video(path, seconds=4, fps=SOURCE_FPS):
    """A movie whose frame i is a flat gray of level 6 * i: the level tells which source frame is shown."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        for i in range(seconds * fps):
            img = np.full((24, 32, 3), 6 * i, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_decode_samples_and_holds_at_30fps(tmp_path):
    make_video(tmp_path / "vid00000001.mkv")
    out = tmp_path / "frames" / "vid00000001"
    n = frames.decode_video(tmp_path / "vid00000001.mkv", out, start=1.0, end=2.0)
    assert n == 30 and not out.with_name("vid00000001.partial").exists()
    for k in range(1, 31):
        level = np.asarray(Image.open(out / f"vid00000001_{k:06d}.jpg")).mean()
        source = int(np.floor((1.0 + (k - 1) / 30) * SOURCE_FPS + 1e-9))  # last source frame at or before t_k
        assert abs(level - 6 * source) < 2.5, (k, level, source)


def test_extract_is_resumable_and_writes_frame_lists(tmp_path):
    videos = tmp_path / "movies"
    videos.mkdir()
    make_video(videos / "-ab0000001.mkv", seconds=2)
    make_video(videos / "cd00000002.mkv", seconds=2)
    root = tmp_path / "ava"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "ava_val_v2.2.csv").write_text("cd00000002,0001,0.1,0.1,0.5,0.9,12,0\n")
    counts = frames.extract_frames(videos, root, start=0.0, end=1.0, default_split="train")
    assert counts == {"-ab0000001": 30, "cd00000002": 30}
    train = ava.frames_by_video(ava.read_frame_list(root / "frame_lists" / "train.csv"))
    val = ava.frames_by_video(ava.read_frame_list(root / "frame_lists" / "val.csv"))
    assert list(train) == ["-ab0000001"] and list(val) == ["cd00000002"]
    assert train["-ab0000001"][0] == "-ab0000001/-ab0000001_000001.jpg" and len(train["-ab0000001"]) == 30
    # a rerun skips finished videos; an interrupted one (left as .partial) is redone
    stamp = (root / "frames" / "-ab0000001" / "-ab0000001_000001.jpg").stat().st_mtime_ns
    (root / "frames" / "cd00000002").rename(root / "frames" / "cd00000002.partial")
    counts = frames.extract_frames(videos, root, start=0.0, end=1.0, default_split="train")
    assert counts == {"cd00000002": 30}
    assert (root / "frames" / "-ab0000001" / "-ab0000001_000001.jpg").stat().st_mtime_ns == stamp


def test_unknown_split_is_a_clear_error(tmp_path):
    videos = tmp_path / "movies"
    videos.mkdir()
    make_video(videos / "zz00000003.mkv", seconds=1)
    from pipeline.errors import InputError
    with pytest.raises(InputError, match="--split"):
        frames.extract_frames(videos, tmp_path / "ava", start=0.0, end=0.5)
