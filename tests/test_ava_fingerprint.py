"""Data fingerprints: content, not place; what they catch and the one thing they are documented to miss."""

import shutil

from pipeline.ava import fingerprint
from pipeline.ava.files import AvaPaths


def test_same_content_elsewhere_same_fingerprint(tiny_ava, tmp_path):
    copy = shutil.copytree(tiny_ava, tmp_path / "elsewhere")
    assert fingerprint.dataset_fingerprint(copy) == fingerprint.dataset_fingerprint(tiny_ava)
    assert all(v is not None for v in fingerprint.split_fingerprint(copy, "val").values())


def test_each_input_changes_its_own_digest(tiny_ava, tmp_path):
    before = fingerprint.dataset_fingerprint(tiny_ava)
    for name, edit in [("groundtruth", lambda p: p.groundtruth("val")), ("detections", lambda p: p.detections("val")),
                       ("exclusions", lambda p: p.exclusions("val")), ("frame_list", lambda p: p.frame_list("val"))]:
        copy = shutil.copytree(tiny_ava, tmp_path / name)
        path = edit(AvaPaths(copy))
        path.write_text(path.read_text() + "\n")
        after = fingerprint.dataset_fingerprint(copy)
        changed = {k for k in before["val"] if before["val"][k] != after["val"][k]}
        assert changed == {name}, name
        assert after["train"] == before["train"] and after["labelmap"] == before["labelmap"]


def test_frames_by_names_sizes_and_a_sample(tiny_ava, tmp_path):
    copy = shutil.copytree(tiny_ava, tmp_path / "frames")
    train_video = AvaPaths(copy).frame_list("train").read_text().splitlines()[1].split()[0]
    files = sorted((AvaPaths(copy).frames / train_video).iterdir())
    base = fingerprint.frames_digest(copy, "train")

    def digest():
        fingerprint.forget()  # within one process the folder's mtime keys the memo; a new process starts empty
        return fingerprint.frames_digest(copy, "train")

    # a frame of another size (re-encoded, truncated): caught, even though the folder's mtime is unchanged
    first = files[0]
    data = first.read_bytes()
    first.write_bytes(data[:-1])
    assert digest() != base
    first.write_bytes(data)
    # the sampled middle frame with the same size but other bytes: caught
    middle = files[len(files) // 2]
    data = middle.read_bytes()
    middle.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    assert digest() != base
    middle.write_bytes(data)
    assert digest() == base
    # documented limit: another frame rewritten in place with the same size is not seen (ava check --deep is)
    other = files[1]
    data = other.read_bytes()
    other.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    assert digest() == base
    # a frame removed or added: caught
    files[-1].unlink()
    assert digest() != base


def test_missing_files_are_none(tmp_path):
    assert fingerprint.file_digest(tmp_path / "nope.csv") is None
    assert fingerprint.frames_digest(tmp_path, "train") is None
    assert set(fingerprint.split_fingerprint(tmp_path, "val").values()) == {None}
