"""mini-AVA: the folder layout other AVA tools read, determinism, atomic writes, and every class rule (the order
pairs' counter scenes: tests/test_mini_order.py)."""

import json
import math
import re

import numpy as np
import pytest
from PIL import Image

from pipeline.ava import files as ava
import pipeline.cli as cli
from pipeline.mini import generator as m
from pipeline.errors import InputError

CLIP = range(-ava.WINDOW // 2, ava.WINDOW // 2)  # frame offsets of a keyframe's clip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return m.generate_mini_ava(tmp_path_factory.mktemp("tiny") / "mini", tiny=True)


@pytest.fixture(scope="module")
def plans():
    """Scene descriptions of the default-size dataset (no pixels: fast)."""
    config = m.MiniAvaConfig.make()
    return [m.plan_video(config, s, i) for s, n in config.split_videos.items() for i in range(n)]


def actors_of(plans):
    for video in plans:
        for episode in video.episodes:
            for actor in episode.actors:
                yield video, episode, actor


# ----------------------------------------------------------------------------------------------- layout


def test_layout_is_read_by_the_ava_readers(tiny):
    paths = ava.AvaPaths(tiny)
    config = m.MiniAvaConfig.make(tiny=True)
    marker = json.loads((tiny / ".complete").read_text())
    assert marker["args"] == {"videos": 4, "seconds": 10, "seed": 0, "tiny": True} and marker["version"] == m.VERSION
    assert paths.labelmap.read_bytes() == ava.SHIPPED_LABELMAP.read_bytes()
    labelmap = ava.read_labelmap(paths.labelmap)
    assert len(labelmap) == 60 and set(m.ACTIONS) <= set(labelmap)
    sizes = set()
    for split, n_videos in config.split_videos.items():
        frame_list = ava.read_frame_list(paths.frame_list(split))
        lines = paths.frame_list(split).read_text().splitlines()
        assert lines[0] == "original_vido_id video_id frame_id path labels"
        assert all(line.endswith(' ""') for line in lines[1:])
        videos = list(dict.fromkeys(frame_list["original_vido_id"]))
        assert len(videos) == n_videos
        for index, vid in enumerate(videos):
            assert re.fullmatch(r"[A-Za-z0-9_-]{11}", vid)
            rows = frame_list[frame_list["original_vido_id"] == vid]
            n = config.seconds * ava.FPS
            assert (rows["video_id"] == index).all() and list(rows["frame_id"]) == list(range(n))
            assert list(rows["path"]) == [f"{vid}/{vid}_{k:06d}.jpg" for k in range(1, n + 1)]
            assert (rows["labels"] == "").all()  # written as "" (PySlowFast's empty labels), read unquoted
            files = sorted(p.name for p in (paths.frames / vid).iterdir())
            assert files == [f"{vid}_{k:06d}.jpg" for k in range(1, n + 1)]
            sizes.add(Image.open(paths.frame_path(vid, 1)).size)
        gt = ava.read_groundtruth(paths.groundtruth(split)).frame()
        assert set(gt["video_id"]) == set(videos)
        assert sorted(set(gt["timestamp"])) == [902 + 3 * e for e in range(config.keyframes_per_video)]
        assert set(gt["action_id"]) <= set(m.ACTIONS)
        postures = gt[gt["action_id"].isin([m.STAND, m.SIT, m.WALK])].groupby(["video_id", "timestamp", "person_id"])
        assert postures.size().eq(1).all() and len(postures) == len(gt.groupby(["video_id", "timestamp", "person_id"]))
        for line in paths.groundtruth(split).read_text().splitlines():
            assert re.fullmatch(r"[A-Za-z0-9_-]{11},\d{4},(\d\.\d{3},){4}\d+,\d+", line), line
        det = ava.read_detections(paths.detections(split)).frame()
        assert det["score"].between(0, 1).all() and (det["score"] >= 0.8).any() and (det["score"] < 0.8).any()
        assert ((det["action_id"] == -1).all()) == (split != "train")
        excluded = ava.read_exclusions(paths.exclusions(split))
        assert excluded and excluded <= {ava.make_key(v, t) for v, t in zip(gt["video_id"], gt["timestamp"])}
    assert sizes == {(80, 45), (60, 45)}  # 16:9 and 4:3
    assert not list(tiny.parent.glob("*.tmp-*"))


def test_episodes_hold_their_keyframe_windows(plans):
    for video in plans:
        covered = []
        for e, episode in enumerate(video.episodes):
            assert episode.second == 902 + 3 * e
            assert episode.key_frame == ava.keyframe_frame_index(episode.second)
            window = ava.clip_frame_indices(episode.key_frame, video.num_frames)
            assert episode.start <= window[0] and window[-1] < episode.stop and window[-1] == episode.key_frame + 31
            assert all(video.episode_at(f) is episode for f in (episode.start, episode.key_frame, episode.stop - 1))
            covered += range(episode.start, episode.stop)
        assert covered == list(range(video.num_frames))


def test_default_size(plans):
    config = m.MiniAvaConfig.make()
    assert config.split_videos == {"train": 48, "val": 16, "test": 16} and config.keyframes_per_video == 24
    assert {(v.width, v.height) for v in plans} == {(160, 90), (120, 90)}
    for video, episode, actor in actors_of(plans):
        box = m.keyframe_boxes(video, episode)[episode.actors.index(actor)][1]
        assert 0.3 < box[3] - box[1] < 0.6  # an actor is a third to a half of the frame height


def test_test_split_is_held_out(plans):
    """test: a fifth of the videos, disjoint from train and val, drawn by the same rules and labelled the same way."""
    small = m.MiniAvaConfig.make(videos=24)
    assert small.split_videos == {"train": 14, "val": 5, "test": 5}
    ids = m.video_ids(small)
    assert set(ids) == set(ava.SPLITS) and len(set().union(*ids.values())) == 24
    by_split = {s: [v for v in plans if v.split == s] for s in ava.SPLITS}
    assert [len(v) for v in by_split.values()] == [48, 16, 16]
    for split in ("val", "test"):
        gt = [line for v in by_split[split] for line in m.annotation_rows(v)[0]]
        actions = {int(line.split(",")[6]) for line in gt}
        assert actions == set(m.ACTIONS)  # every class is in both held-out splits
    with pytest.raises(ValueError, match="videos must be >= 3"):
        m.MiniAvaConfig(videos=2)


def test_pytorchvideo_reads_the_folder(tiny):
    pv_ava = pytest.importorskip("pytorchvideo.data.ava")
    paths = ava.AvaPaths(tiny)
    for split in ("train", "val"):
        clips = pv_ava.AvaLabeledVideoFramePaths.from_csv(
            str(paths.frame_list(split)), str(paths.groundtruth(split)), str(paths.frames), str(paths.labelmap))
        gt = ava.read_groundtruth(paths.groundtruth(split)).frame()
        assert len(clips) == len(gt.groupby(["video_id", "timestamp"]))
        for frame_dir, labels in clips:
            assert len(labels["boxes"]) == len(labels["labels"]) > 0


# ----------------------------------------------------------------------------------------------- writing


def files_of(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_bytes(tiny, tmp_path):
    again = m.generate_mini_ava(tmp_path / "again", tiny=True, workers=2)  # worker processes change no byte
    reference = files_of(tiny)
    assert files_of(again) == reference
    other = files_of(m.generate_mini_ava(tmp_path / "other", tiny=True, seed=1))
    assert other.keys() != reference.keys()  # other video ids
    assert other["annotations/ava_train_v2.2.csv"] != reference["annotations/ava_train_v2.2.csv"]


def test_rerun_is_a_no_op_and_other_arguments_are_refused(tiny):
    before = {p: p.stat().st_mtime_ns for p in tiny.rglob("*")}
    assert m.generate_mini_ava(tiny, tiny=True) == tiny
    assert {p: p.stat().st_mtime_ns for p in tiny.rglob("*")} == before
    with pytest.raises(InputError, match="other arguments"):
        m.generate_mini_ava(tiny, tiny=True, seed=3)


def test_a_crash_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    def crash(video, frames_dir):
        raise RuntimeError("disk full")

    monkeypatch.setattr(m, "write_video_frames", crash)
    with pytest.raises(RuntimeError):
        m.generate_mini_ava(tmp_path / "mini", tiny=True)
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_and_reruns(tmp_path, capsys):
    assert cli.main(["mini-ava", str(tmp_path / "mini"), "--tiny", "--seconds", "7", "--videos", "3"]) == 0
    assert "2 train / 2 val / 2 test keyframes" in capsys.readouterr().out
    assert cli.main(["mini-ava", str(tmp_path / "mini"), "--tiny", "--seconds", "7", "--videos", "3"]) == 0
    assert cli.main(["mini-ava", str(tmp_path / "bad"), "--seconds", "2"]) == 2


def test_contact_sheet(tiny, tmp_path):
    from pipeline.mini.contact_sheet import contact_sheet

    out = contact_sheet(tiny, tmp_path / "sheet.png", tiles=3)
    assert Image.open(out).size[0] == 3 * 480


# ----------------------------------------------------------------------------------------------- class rules


def test_every_class_is_common_enough(plans):
    counts = {a: 0 for a in m.ACTIONS}
    n = 0
    for _, episode, actor in actors_of(plans):
        n += 1
        actions = m.actor_actions(episode, actor)
        assert len({m.STAND, m.SIT, m.WALK} & set(actions)) == 1
        for a in actions:
            counts[a] += 1
    rare = {m.PICK_UP, m.PUT_DOWN}  # one actor in 40 % of the episodes, half each
    assert all(c / n > (0.05 if a in rare else 0.1) for a, c in counts.items()), counts


def test_postures_stand_sit_walk(plans):
    for _, episode, actor in actors_of(plans):
        h = actor.height
        poses = [m.pose_at(actor, u) for u in CLIP]
        travel = abs(poses[-1].hip[0] - poses[0].hip[0])
        hip_height = actor.ground_y - poses[32].hip[1]
        if actor.posture == "walk":
            assert travel > 0.35 * h * 63 / 30 * 0.99 and np.sign(poses[-1].hip[0] - poses[0].hip[0]) == actor.facing
            feet_gap = [abs(p.feet[0][0] - p.feet[1][0]) for p in poses]
            assert max(feet_gap) > 0.25 * h  # legs swing
        else:
            assert travel == 0 and all(p.feet == poses[0].feet for p in poses)
            expected = m.SEAT if actor.posture == "sit" else m.LEG_THIGH + m.LEG_SHIN
            assert hip_height == pytest.approx(expected * h)


def test_carry_the_prop_is_at_the_front_hand_all_episode(plans):
    empty_hold_pose = near_prop = 0
    for _, episode, actor in actors_of(plans):
        held = [p for p in episode.props if p.holder == actor.person_id]
        carries = m.CARRY in m.actor_actions(episode, actor)
        assert carries == bool(held)
        for u in range(episode.start - episode.key_frame, episode.stop - episode.key_frame, 7):
            hand = m.pose_at(actor, u).hand0
            if held:
                assert m.prop_center(held[0], episode, u) == hand
            elif actor.role == "none":  # nobody else's prop touches this actor's hand (counter scenes: test_mini_order)
                for prop in episode.props:
                    if not prop.changes and prop.holder != actor.person_id:
                        c = m.prop_center(prop, episode, u)
                        assert prop.holder >= 0 or math.dist(c, hand) > 0.5 * prop.size or actor.arm0 == "rest"
        if not held and actor.role == "none":
            empty_hold_pose += actor.arm0 == "hold"
            near_prop += any(p.at and abs(p.at[0] - actor.x) < actor.height for p in episode.props)
    assert empty_hold_pose > 20 and near_prop > 50  # the distractors exist


def test_hand_wave_oscillates_and_a_raised_arm_stays_still(plans):
    still = 0
    for _, episode, actor in actors_of(plans):
        xs = np.array([(lambda p: p.hand1[0] - p.shoulder[0])(m.pose_at(actor, u)) for u in CLIP])  # walkers move
        if actor.arm1 == "wave":
            assert m.WAVE in m.actor_actions(episode, actor)
            x = xs - np.mean(xs)
            crossings = np.count_nonzero(np.diff(np.sign(x)) != 0)
            assert crossings >= 2 * 2.0 * 64 / 30 - 2  # 2-3 Hz over the 2.1 s clip
            assert np.ptp(xs) > 0.1 * actor.height
        else:
            assert m.WAVE not in m.actor_actions(episode, actor)
            if actor.arm1 == "raised":
                still += 1
                hand = m.pose_at(actor, 0).hand1
                assert hand[1] < m.pose_at(actor, 0).shoulder[1] and np.ptp(xs) < 1e-9
    assert still > 20


def test_watch_means_a_person_in_front_within_reach_of_sight(plans):
    labels = []
    for _, episode, actor in actors_of(plans):
        ahead = [actor.facing * (o.x - actor.x) / actor.height for o in episode.actors if o is not actor]
        expected = any(m.WATCH_RANGE[0] < d <= m.WATCH_RANGE[1] for d in ahead)
        assert (m.WATCH in m.actor_actions(episode, actor)) == expected
        if actor.role == "none":
            labels.append(expected)
    assert 0.3 < np.mean(labels) < 0.8  # context decides, both ways


# ----------------------------------------------------------------------------------------------- pixels


def test_pixels_show_the_scene(tiny):
    """Props are drawn where the scene says, and the JPEG files hold the rendered frames."""
    config = m.MiniAvaConfig.make(tiny=True)
    checked = 0
    for split, n in config.split_videos.items():
        for i in range(n):
            video = m.plan_video(config, split, i)
            for episode in video.episodes:
                for u in (-32, 0, 31):
                    raw = m.render_frame(video, episode.key_frame + u)
                    for prop in episode.props:
                        if prop.at is None and not prop.changes:  # a counter scene's prop is mostly hidden
                            x, y = m.prop_center(prop, episode, u)
                            assert tuple(raw[int(y), int(x)]) == prop.color
                            checked += 1
                    decoded = np.asarray(Image.open(ava.AvaPaths(tiny).frame_path(video.video_id, episode.key_frame + u + 1)))
                    other = m.render_frame(video, video.episodes[(episode.index + 1) % len(video.episodes)].key_frame)
                    error = np.abs(decoded.astype(int) - raw).mean()  # JPEG and sensor noise
                    assert error < 10 and error < 0.5 * np.abs(decoded.astype(int) - other).mean()
    assert checked > 5


def test_detector_boxes_jitter_miss_and_false_positives(plans):
    """Detector boxes: jittered ground truth (IoU mostly >= 0.7), a few misses, high scores on people, low-score
    false positives; train boxes that overlap a person with IoU >= 0.9 carry its actions, val boxes carry none."""
    for split in ("train", "val"):
        matched_iou, matched_score, fp_score, n_gt = [], [], [], 0
        for video in [v for v in plans if v.split == split]:
            gt_lines, det_lines = m.annotation_rows(video)
            gt, det = {}, {}
            for line in gt_lines:
                f = line.split(",")
                gt.setdefault((f[1], tuple(map(float, f[2:6]))), set()).add(int(f[6]))
            for line in det_lines:
                f = line.split(",")
                det.setdefault((f[1], tuple(map(float, f[2:6])), float(f[7])), set()).update([f[6]] if f[6] else [])
            n_gt += len(gt)
            for (sec, box, score), actions in det.items():
                best = max(((m._iou(box, g), a) for (s, g), a in gt.items() if s == sec), key=lambda t: t[0])
                if best[0] >= 0.5:
                    matched_iou.append(best[0])
                    matched_score.append(score)
                else:
                    fp_score.append(score)
                expected = best[1] if split == "train" and best[0] >= 0.9 else set()
                assert {int(a) for a in actions} == expected
        recall = len(matched_iou) / n_gt
        assert 0.9 < recall < 0.99
        assert np.mean(np.array(matched_iou) >= 0.7) > 0.95 and np.mean(np.array(matched_score) >= 0.8) > 0.8
        assert len(fp_score) > 20 and np.mean(np.array(fp_score) < 0.8) > 0.8
