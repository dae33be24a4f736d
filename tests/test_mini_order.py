"""mini-AVA order pairs (give/take, pick up/put down): the rules of the counter scenes (generator docstring).

(1) the two classes of a pair have the same per-pixel time means in each pathway, (2) no receptive field of the mini
backbone's fast pathway sees both states and every such window of a clip is a window of the other class, (3) the
order is in the sequence. Pixels are the rendered frames before sensor noise and JPEG (``render_episode_frame``).
"""

import numpy as np
import pytest
import torch

from pipeline.ava import files as ava
from pipeline.features.backbone import PRESETS, build_backbone
from pipeline.mini import generator as m

ROLES = {m.GIVE: "giver", m.TAKE: "taker", m.PICK_UP: "picker", m.PUT_DOWN: "putter"}


@pytest.fixture(scope="module")
def plans():
    config = m.MiniAvaConfig.make()
    return [m.plan_video(config, s, i) for s, n in config.split_videos.items() for i in range(n)]


def counter_scenes(plans):
    for video in plans:
        for episode in video.episodes:
            if episode.counter is not None:
                yield video, episode


@pytest.fixture(scope="module")
def sample(plans):
    """Six counter scenes of the default size, both kinds and both classes of each pair among them."""
    pairs, singles = [], []
    for video, episode in counter_scenes(plans[:6]):
        (pairs if len(order_actors(episode)) == 2 else singles).append((video, episode))
    chosen = pairs[:3] + singles[:3]
    assert {a.role for _, e in chosen for a in order_actors(e)} == set(ROLES.values())
    return chosen


def order_actors(episode):
    return [a for a in episode.actors if a.role != "none"]


def fast_u(video, episode) -> tuple[np.ndarray, np.ndarray]:
    """(slow, fast) frame offsets from the keyframe of the keyframe's clip."""
    slow, fast = ava.pathway_frame_indices(episode.key_frame, video.num_frames)
    return slow - episode.key_frame, fast - episode.key_frame


def render(video, episode, us) -> dict[int, np.ndarray]:
    background = m._background(episode, video.width, video.height)
    return {int(u): np.asarray(m.render_episode_frame(episode, background, episode.key_frame + int(u)), np.int64)
            for u in us}


def counter_columns(episode) -> slice:
    c = episode.counter
    return slice(max(0, int(c.x1) - 1), int(np.ceil(c.x2)) + 2)


# ----------------------------------------------------------------------------------------------- the backbone's fields


def temporal_field(net, pathway: int, t: int, frames: tuple[int, int]) -> np.ndarray:
    """Indices of the fast input frames whose gradient reaches res5 time step ``t`` of ``pathway`` (0 slow, 1 fast)."""
    slow = torch.randn(1, 3, frames[0], 32, 32)
    fast = torch.randn(1, 3, frames[1], 32, 32, requires_grad=True)
    out = net([slow, fast])[pathway][0, :, t].abs().sum()
    out.backward()
    return np.flatnonzero(fast.grad.abs().sum((0, 1, 3, 4)).numpy() > 0)


def test_receptive_fields_of_the_mini_backbone():
    """The fast pathway's temporal field from its kernels (13 fast frames) is what the gradient reaches; the slow
    pathway reaches 31 fast frames through the laterals (the docstring's numbers)."""
    cfg = PRESETS["mini"]
    torch.manual_seed(0)
    net = build_backbone(cfg).eval()
    # A linear copy reaches every frame the kernels reach: pytorchvideo zero-initialises each bottleneck's last norm
    # (its branch would pass nothing), and at these widths (1 fast stem channel) ReLUs often close whole paths.
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, torch.nn.BatchNorm3d):
                mod.weight.fill_(1.0)
            for name, child in mod.named_children():
                if isinstance(child, torch.nn.ReLU):
                    setattr(mod, name, torch.nn.Identity())
    fast_convs = [mod for block in net.blocks for mod in block.multipathway_blocks[1].modules()
                  if isinstance(mod, torch.nn.Conv3d)]
    assert all(c.stride[0] == 1 and c.dilation[0] == 1 for c in fast_convs)
    field = 1 + sum(c.kernel_size[0] - 1 for c in fast_convs)  # convs in series; the 1x1x1 shortcuts add nothing
    assert field == 13 == 1 + 4 + 4 * 2
    reached = temporal_field(net, 1, 16, (cfg.t_slow, cfg.t_fast))
    assert reached.tolist() == list(range(16 - 6, 16 + 7))
    spacing = cfg.window // cfg.t_fast
    assert (field - 1) * spacing == 24  # video frames between the first and last frame of a fast field
    slow_reached = temporal_field(net, 0, 4, (cfg.t_slow, cfg.t_fast))
    assert slow_reached.tolist() == list(range(1, 32))


# ----------------------------------------------------------------------------------------------- labels and layout


def test_counter_scenes_follow_their_rules(plans):
    kinds = {"pair": 0, "single": 0}
    giver_left = picker = 0
    for video, episode in counter_scenes(plans):
        actors = order_actors(episode)
        prop = next(p for p in episode.props if p.changes)
        assert sum(p.changes for p in episode.props) == 1
        c = episode.counter
        for a in actors:
            actions = m.actor_actions(episode, a)
            assert a.posture == "stand" and a.arm0 == "show" and m.ROLE_ACTIONS[a.role] in actions
            assert m.CARRY not in actions and not set(actions) & (set(ROLES) - {m.ROLE_ACTIONS[a.role]})
            assert c.x1 < a.x < c.x2
        if len(actors) == 2:
            kinds["pair"] += 1
            giver = next(a for a in actors if a.role == "giver")
            taker = next(a for a in actors if a.role == "taker")
            assert (prop.first, prop.then) == (giver.person_id, taker.person_id)
            assert giver.facing == np.sign(taker.x - giver.x) == -taker.facing
            assert all(m.WATCH in m.actor_actions(episode, a) for a in actors)
            giver_left += giver.x < taker.x
        else:
            kinds["single"] += 1
            (a,) = actors
            assert (prop.first, prop.then) == ((-1, a.person_id) if a.role == "picker" else (a.person_id, -1))
            assert c.x1 < prop.at[0] < c.x2
            picker += a.role == "picker"
        for u in range(episode.start - episode.key_frame, episode.stop - episode.key_frame):
            assert m.prop_hand(prop, u) == (prop.first if u < m.CHANGE else prop.then)
            for other in episode.actors:  # nobody else enters the counter's columns
                if other.role == "none":
                    x1, _, x2, _ = m.pose_at(other, u).box()
                    assert x2 < c.x1 - 1 or x1 > c.x2 + 1, (video.video_id, episode.index, u)
        mirror = m.mirror_order(episode)
        for a, b in zip(episode.actors, mirror.actors):
            assert set(m.actor_actions(mirror, b)) ^ set(m.actor_actions(episode, a)) == (
                {m.ROLE_ACTIONS[a.role], m.ROLE_ACTIONS[m.OTHER_ROLE[a.role]]} if a.role != "none" else set())
    n_episodes = sum(len(v.episodes) for v in plans)
    assert kinds["pair"] / n_episodes == pytest.approx(m.ORDER_EVENT_P["pair"], abs=0.04)
    assert kinds["single"] / n_episodes == pytest.approx(m.ORDER_EVENT_P["single"], abs=0.04)
    # each class of a pair is a coin given the rest of the scene: about half each (hundreds of scenes: +-0.1 is > 3 sd)
    assert 0.4 < giver_left / kinds["pair"] < 0.6 and 0.4 < picker / kinds["single"] < 0.6


# ----------------------------------------------------------------------------------------------- the rules, on pixels


def test_rule1_the_two_classes_have_the_same_time_means_in_each_pathway(sample):
    """Per-pixel sums over the fast frames are equal (exactly: integers before noise); every slow frame is the same
    in both classes. The fast frames themselves differ, so the equality is not that of two identical clips."""
    for video, episode in sample:
        slow, fast = fast_u(video, episode)
        a, b = render(video, episode, np.union1d(slow, fast)), render(video, m.mirror_order(episode), np.union1d(slow, fast))
        assert np.array_equal(sum(a[u] for u in fast), sum(b[u] for u in fast))
        assert all(np.array_equal(a[u], b[u]) for u in slow)
        assert any(not np.array_equal(a[u], b[u]) for u in fast)


def test_rule2_no_fast_receptive_field_sees_both_states(sample):
    """The fast frames where the classes differ (where the state shows) are two groups at least a field (13 fast
    frames) apart; every 13-frame window of fast frames, within the counter's columns, is frame for frame a window of
    the mirror: the same one, or the one 36 frames later or earlier (the episode runs on beyond the clip)."""
    field, spacing = 13, 2
    shift = m.GLIMPSES[1] - m.GLIMPSES[0]
    for video, episode in sample:
        _, fast = fast_u(video, episode)
        cols = counter_columns(episode)
        us = np.arange(fast[0] - shift, fast[-1] + shift + 1, spacing)
        us = us[(us >= episode.start - episode.key_frame) & (us < episode.stop - episode.key_frame)]
        a = {u: f[:, cols] for u, f in render(video, episode, us).items()}
        b = {u: f[:, cols] for u, f in render(video, m.mirror_order(episode), us).items()}
        differ = np.array([k for k, u in enumerate(fast) if not np.array_equal(a[u], b[u])])
        assert differ.tolist() == [6, 7, 24, 25]  # u = -20 -18 and 16 18
        first, second = differ[differ < 16], differ[differ >= 16]
        assert second.min() - first.max() >= field  # no field of 13 fast positions holds both
        for start in range(len(fast) - field + 1):
            window = fast[start:start + field]
            matches = [s for s in (0, shift, -shift) if all(u + s in b for u in window)
                       and all(np.array_equal(a[u], b[u + s]) for u in window)]
            assert matches, (video.video_id, episode.index, int(window[0]))


def test_rule3_the_order_is_in_the_sequence(sample):
    """At the first raise's fast frames the prop shows where it is first, at the second where it is then; within the
    counter's columns the mirror is the clip played backwards (u -> 2 CHANGE - u)."""
    for video, episode in sample:
        _, fast = fast_u(video, episode)
        frames = render(video, episode, fast)
        mirror = render(video, m.mirror_order(episode), fast)
        prop = next(p for p in episode.props if p.changes)
        cols = counter_columns(episode)
        for u in fast:
            assert np.array_equal(frames[u][:, cols], mirror[2 * m.CHANGE - u][:, cols])
        for us, holder in (((-20, -18), prop.first), ((16, 18), prop.then)):
            for u in us:
                if holder >= 0:  # the prop is drawn at the raised hand, above the counter
                    x, y = m.pose_at(episode.actor(holder), u).hand0
                    assert y < episode.counter.top - prop.size / 2
                    assert tuple(frames[u][int(y), int(x)]) == prop.color
                for a in order_actors(episode):
                    if a.person_id != holder:  # no prop at the other raised hand
                        x, y = m.pose_at(a, u).hand0
                        r = int(prop.size / 2)
                        patch = frames[u][int(y) - r:int(y) + r + 1, int(x) - r:int(x) + r + 1]
                        assert not (patch == np.array(prop.color)).all(-1).any()
