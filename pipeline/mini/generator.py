"""``stctx mini-ava OUT``: a generated AVA v2.2 look-alike, small enough for a laptop CPU, hard in the right places.

The folder it writes is an AVA folder (the layout of ``pipeline.ava.files``, read as is by PySlowFast and pytorchvideo):

    OUT/frames/<vid>/<vid>_%06d.jpg            JPEG (quality 90), 30 fps, frame 1 = first frame after second 900
    OUT/frame_lists/{train,val,test}.csv       ``original_vido_id video_id frame_id path labels``, space separated
    OUT/annotations/ava_{train,val,test}_v2.2.csv   ground truth, one row per (box, action), %.3f coordinates
    OUT/annotations/ava_{train,val,test}_excluded_timestamps_v2.2.csv
    OUT/annotations/ava_action_list_v2.2_for_activitynet_2019.pbtxt   the real 60-class v2.2 label map (a copy)
    OUT/annotations/person_box_67091280_iou90/ava_detection_{train_boxes_and_labels_include_negative_v2.2,
                                                               val_boxes_and_labels,test_boxes_and_labels}.csv
    OUT/.complete                              JSON (generator version and arguments), written last

Time line of a video. A video of ``S`` seconds has ``30 S`` frames (seconds 900 .. 900 + S). It is cut into
3-second *episodes*: episode ``e`` has its keyframe at second ``902 + 3e`` (frame index ``60 + 90e``) and covers
frames ``15 + 90e .. 104 + 90e``, so the 64-frame window of its keyframe (``-32 .. +31``) lies inside it and no
window sees two episodes (the first episode also covers frames 0..14, the last one runs to the end of the video).
Only these seconds are annotated. Between episodes the scene cuts. Each episode draws a new scene with a static
camera: a textured wall and floor, posters, shelves of small things, tall non-person things (plant, lamp, coat
rack, TV), chairs, props lying around, at most one counter, and 2-4 actors (stick figures with a head whose hair sits on the back and
nose on the front, so the facing side shows) who keep their actions for the whole episode. Person ids are unique
within a video. Frames are 160x90 (16:9) or 120x90 (4:3), alternating by video; actors are 0.42-0.5 of the frame
height (``--tiny``: half that size, 80x45 / 60x45).

Classes (real AVA v2.2 ids; every actor has exactly one posture, the rest are optional), one rule each:

- 12 ``stand``: the body stays upright and in place over the episode, legs straight (a random stance width).
- 11 ``sit``: hips on a stool, thighs horizontal towards the facing side, shins down. Empty stools are scenery too.
- 14 ``walk``: the actor moves towards its facing side at 0.35-0.6 heights per second while legs and the back arm
  swing (0.9-1.3 strides per second); at the keyframe the legs may be together, as in a standing pose.
- 17 ``carry/hold (an object)``: a prop (box, ball or bag) sits at the front hand for the whole episode, the front
  arm bent forward at waist height. Cue: is the thing at the hand? Others hold the same empty-handed pose (30 %),
  the same props lie on the floor next to half of the non-carriers and elsewhere in the scene.
- 80 ``watch (a person)``: another actor stands in front of the actor's face at the keyframe: its body is on the
  facing side at a horizontal distance in (0.25 h, 1.5 h], h the watcher's height (``WATCH_RANGE``). Cue: where the other people
  are, outside the actor's box. Tall non-person things are often put in front of actors who watch nobody.
- Order pairs (``ORDER_PAIRS``): 65 ``give/serve (an object) to (a person)`` / 78 ``take (an object) from (a person)``
  and 36 ``lift/pick up`` / 47 ``put down``, the classes that differ only in the order of two states. They happen in
  *counter scenes* (at most one an episode; 30 % of episodes hold a give/take pair, 40 % one actor who picks up or
  puts down): standing actors behind a counter, a box drawn over everything below their chests (``COUNTER_TOP``), in
  front of which nobody else ever is. A giver and a taker face each other 0.8 heights apart (they watch each other);
  a single actor faces either way. Every counter actor's front arm rests behind the counter, except twice: it is
  raised above the head and lowered again around ``u = -19`` and ``u = +17`` (u: frames from the keyframe; 7
  frames each, ``raised``), the same motion in every counter scene. The prop (0.24 heights, ``ORDER_PROP``) is at
  one place before frame ``CHANGE = -1`` and at another from it on: at the giver's hand, then the taker's; on the
  floor behind the counter, then at the picker's hand; at the putter's hand, then on the floor. The change itself
  is hidden; only the two raises show where the prop is: in the raised hand or not. Give and take (pick up and put
  down) are the same pixels in the other order. The rules, each with its test (tests/test_mini_order.py):
  (1) Same time means. ``mirror_order`` turns a scene into the same scene with the other class of each pair; the
  fast frames of a clip (the even u of -32 .. 30) are symmetric about u = -1 and so are the raises, so within the
  counter's columns the mirror is the clip played backwards, and every per-pixel mean over the fast frames is the
  same for both classes. The slow frames (u = -32 -24 -16 -6 2 12 20 30) fall outside the raises' visible part: the
  slow pathway sees the same frames in both classes. Each class of a pair is drawn with probability 1/2 given the
  rest of the scene.
  (2) No receptive field sees the order. The mini backbone's fast pathway has temporal kernels 5 (stem) and 3
  (res2..res5, one bottleneck each), stride 1: a fast res5 position sees 1 + 4 + 4 * 2 = 13 fast frames, 24 video
  frames apart at most (fast frames are 2 apart). The fast frames that show the state are u = -20, -18 (first
  raise) and 16, 18 (second raise), 34 frames apart: no fast position sees both states, and every 13-frame fast
  window of a clip is, frame for frame within the counter's columns, a window of its mirror (the same window if it
  holds no raise, else the one 36 frames later or earlier: each raise is the same forward motion in both classes).
  The slow pathway's own temporal kernels (3 at res4 and res5) on frames 8-10 apart, with the fast-to-slow laterals
  (kernel 7, stride 4), give a slow res5 position up to 31 of the 32 fast frames: the slow maps could in principle
  combine both raises; only the fast frames they come from carry them. Zero padding at the ends of the clip also
  lets positions near the ends see which raise is first.
  (3) The order is in the sequence: the fast frames at u = -20 and -18 show the prop where it is first (the
  raised hand, or no prop at all), those at 16 and 18 where it is then. The space-pooled fast sequence holds the two
  raises at fast positions 6-7 and 24-25 (their receptive fields: 0-13 and 18-31).
  None of the counter actors is labelled carry/hold (the prop is hidden at the keyframe).
- 69 ``hand wave``: the back arm is raised and its forearm swings about the vertical at 2-3 Hz by 25-40 degrees.
  Distractor: 25 % of the others raise the back arm the same way and keep it still at a random point of the swing,
  so a single frame of a waver and of a still raised arm have the same distribution.

Splits: ``train``, ``val`` and ``test``, disjoint videos drawn by one rule. ``test`` is held out: stctx chooses every
default (sizes, learning rates, epochs, the dataset size) by ``val`` mAP and reports Table 1 on ``test``, which no
choice has seen. Each is a fifth of the videos (``MiniAvaConfig.split_videos``).

Detector boxes (every split): each ground-truth box, missed with probability 0.05, else jittered (IoU mostly
0.85-0.97 on train, 0.8-0.95 on val and test: ``DET_JITTER``) with a score mostly >= 0.8 (10 % in 0.5-0.8); plus low-score
false positives on tall things and clutter
(one in ten of them scores 0.8-0.9). As in AVA, the train file labels a detector box with the actions of the
ground-truth box it overlaps with IoU >= 0.9 (one row per action) and leaves the action empty otherwise (a
negative); the val and test files leave every action empty. Exclusions: about 3 % of each split's keyframes (at least
one); as in the evaluation reference case, their ground truth rows stay in the file and the evaluator ignores them.

Default size: 80 videos (48 train, 16 val, 16 test) of 75 seconds, i.e. 24 keyframes per video, 1152 train and 384
val and 384 test keyframes with about 2.7 actors each, 180,000 frames, about 940 MB, about 60 CPU-seconds to
generate.
Share of actors per class (seed 0): stand 66 %, sit 21 %, walk 13 %, carry/hold 19 %, watch 66 %, give 11 %,
take 11 %, pick up 7 %, put down 7 %, hand wave 15 %; 69 % of the episodes are counter scenes. It was 16 videos until
the context heads were found to need more training clips than 288 keyframes to generalise (README).
``--tiny``: 4 videos (2 + 1 + 1) of 10 seconds, 3 keyframes each, half-size frames, under a second.
Same arguments, same bytes: everything is drawn from numpy Generators seeded by (seed, split, video, purpose), and
JPEGs are written by Pillow with fixed settings and no metadata; worker processes render whole videos, so their
number does not change any byte.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
from PIL import Image, ImageDraw

from pipeline.ava import files as ava
from pipeline.errors import InputError
from pipeline.outputs import temporary_dir

VERSION = 4  # bump whenever the bytes for the same arguments change
JPEG_QUALITY = 90

SIT, STAND, WALK, CARRY, PICK_UP, PUT_DOWN, GIVE, WAVE, TAKE, WATCH = 11, 12, 14, 17, 36, 47, 65, 69, 78, 80
# classes that differ only in the order of events (the counter scenes): the temporal claim's test
ORDER_PAIRS = ((GIVE, TAKE), (PICK_UP, PUT_DOWN))
ACTIONS = (SIT, STAND, WALK, CARRY, PICK_UP, PUT_DOWN, GIVE, WAVE, TAKE, WATCH)
SHORT_NAMES = {SIT: "sit", STAND: "stand", WALK: "walk", CARRY: "carry/hold", PICK_UP: "pick up", PUT_DOWN: "put down",
               GIVE: "give to", WAVE: "hand wave", TAKE: "take from", WATCH: "watch person"}
ROLE_ACTIONS = {"giver": GIVE, "taker": TAKE, "picker": PICK_UP, "putter": PUT_DOWN}
OTHER_ROLE = {"giver": "taker", "taker": "giver", "picker": "putter", "putter": "picker"}

EPISODE_FRAMES = 90  # 3 s: keyframes every 3rd second
FIRST_KEY_FRAME = (ava.FIRST_KEYFRAME - ava.FIRST_SECOND) * ava.FPS  # 60
HALF_WINDOW = ava.WINDOW // 2  # the clip of a keyframe is key-32 .. key+31
EPISODE_LEAD = 45  # an episode spans key-45 .. key+44

# Body proportions, in units of the standing height h.
HEAD_R = 0.1
LEG_THIGH, LEG_SHIN = 0.24, 0.23
TORSO = 0.3
ARM_UPPER, ARM_FORE = 0.19, 0.17
SEAT = LEG_SHIN  # hip height of a sitter above the ground
# Arm angles in degrees from straight down, positive towards the facing side: (upper arm, forearm).
ARM_REST = (8.0, 18.0)
ARM_HOLD = (25.0, 95.0)
WATCH_RANGE = (0.25, 1.5)
# The counter scenes (module docstring). Frames are counted from the keyframe (u); the fast pathway sees the even u of
# -32 .. 30, the slow pathway u = -32 -24 -16 -6 2 12 20 30 (pipeline.ava.pathway_frame_indices).
ARM_SHOW = (150.0, 170.0)  # the front arm raised above the head
GLIMPSES = (-19, 17)  # the two raises: symmetric about u = -1, the centre of the fast frames, and 36 frames apart
RAISE_HALF = 3.5  # a raise lasts |u - c| < 3.5: 7 frames, none of them a slow frame
CHANGE = -1  # the state changes here, hidden: the prop is at its first place for u < CHANGE, at its second from it
COUNTER_TOP = 0.12  # the counter's top edge below the shoulders, in heights: a hand at rest and its prop stay behind it
ORDER_PROP = 0.24  # size of the passed, picked up or put down prop, in heights
COUNTER_MARGIN = 0.4  # the counter reaches this far beyond its actors' axes, in heights
KEEP_OUT = 0.5  # every other person's axis stays this far from the counter's ends all episode (arms, feet: < 0.5)
PAIR_GAP = 0.8  # distance between the two axes of a give/take pair, in heights (they watch each other)
ORDER_EVENT_P = {"pair": 0.3, "single": 0.4}  # per episode; at most one counter scene each
# Detector box jitter, std of each coordinate as a fraction of the box size. Tighter on train (IoU mostly >= 0.9, so
# most train detector boxes carry their person's labels, as AVA's detector trained on train gives) than on val
# (IoU mostly 0.8-0.95).
DET_JITTER = {"train": 0.02, "val": 0.035, "test": 0.035}
DISTRACTOR_P = {"hold_pose": 0.3, "raised_still": 0.25, "prop_nearby": 0.5}

Posture = Literal["stand", "sit", "walk"]
Arm0 = Literal["rest", "hold", "show"]
Arm1 = Literal["rest", "wave", "raised"]
Role = Literal["none", "giver", "taker", "picker", "putter"]
Color = tuple[int, int, int]
Point = tuple[float, float]


# ----------------------------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class MiniAvaConfig:
    """What a mini-AVA is made of; the fields are exactly the generator's arguments (and its identity)."""

    videos: int = 80
    seconds: int = 75
    seed: int = 0
    tiny: bool = False

    def __post_init__(self):
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0 (a numpy seed), got {self.seed}")
        if self.videos < 3:
            raise ValueError(f"videos must be >= 3 (one train, one val and one test video at least), got {self.videos}")
        if not 4 <= self.seconds <= 900:
            raise ValueError(f"seconds must be in 4..900 (a keyframe needs frames 28..91), got {self.seconds}")

    @classmethod
    def make(cls, videos: int | None = None, seconds: int | None = None, seed: int = 0, tiny: bool = False):
        """The defaults of the chosen size for the arguments left as ``None`` (only ``None``: 0 is refused, not
        taken for the default)."""
        return cls(videos=(4 if tiny else 80) if videos is None else videos,
                   seconds=(10 if tiny else 75) if seconds is None else seconds, seed=seed, tiny=tiny)

    @property
    def split_videos(self) -> dict[str, int]:
        """A fifth of the videos each for val and test (one at least), the rest train."""
        held = max(1, round(self.videos / 5))
        return {"train": self.videos - 2 * held, "val": held, "test": held}

    @property
    def keyframes_per_video(self) -> int:
        frames = self.seconds * ava.FPS
        return min((frames - 1 - HALF_WINDOW + 1 - FIRST_KEY_FRAME) // EPISODE_FRAMES + 1,
                   (ava.LAST_KEYFRAME - ava.FIRST_KEYFRAME) // 3 + 1)

    def frame_size(self, wide: bool) -> tuple[int, int]:
        """(width, height) of a 16:9 (``wide``) or 4:3 video."""
        size = (160, 90) if wide else (120, 90)
        return (size[0] // 2, size[1] // 2) if self.tiny else size


# ----------------------------------------------------------------------------------------------- scene description


@dataclass(frozen=True)
class Actor:
    """One person of an episode. Pixel units; ``x`` is the body axis (hips) at the keyframe, ``ground_y`` the floor."""

    person_id: int
    posture: Posture
    facing: int  # +1 faces right, -1 faces left
    x: float
    ground_y: float
    height: float
    speed: float = 0.0  # px per frame towards the facing side (walkers)
    gait_hz: float = 1.0
    gait_phase: float = 0.0
    stance: float = 0.0  # leg spread of a stander, degrees
    arm0: Arm0 = "rest"  # the front arm
    arm1: Arm1 = "rest"  # the back arm
    wave_hz: float = 2.5
    wave_phase: float = 0.0
    wave_amp: float = 30.0  # degrees
    raise_angle: float = 120.0  # upper back arm when raised, degrees
    role: Role = "none"
    partner: int = -1  # person id of the other actor of a give/take
    skin: Color = (200, 160, 130)
    hair: Color = (40, 30, 20)
    shirt: Color = (200, 40, 40)
    pants: Color = (40, 40, 80)


@dataclass(frozen=True)
class Prop:
    """A small thing: held by ``holder``, lying still at ``at``, or, in a counter scene, at the front hand of ``first``
    before ``CHANGE`` and of ``then`` from it (-1: on the floor behind the counter, at ``at``)."""

    kind: Literal["box", "ball", "bag"]
    color: Color
    size: float
    holder: int = -1
    first: int = -1
    then: int = -1
    at: Point | None = None

    @property
    def changes(self) -> bool:
        """Whether this is the prop of a counter scene (it changes place, hidden, at ``CHANGE``)."""
        return self.first != self.then


@dataclass(frozen=True)
class Counter:
    """A counter in front of the actors of a counter scene, drawn over them: x1..x2 from ``top`` down to ``bottom``."""

    x1: float
    x2: float
    top: float
    bottom: float
    color: Color


@dataclass(frozen=True)
class Thing:
    """Scenery drawn into the background: a tall non-person thing or a stool. ``x`` is its centre at the floor."""

    kind: Literal["plant", "lamp", "rack", "tv", "stool"]
    x: float
    ground_y: float
    height: float
    color: Color


@dataclass(frozen=True)
class Episode:
    """A 3-second scene; ``key_frame`` is the 0-based frame index of its keyframe second ``second``."""

    index: int
    second: int
    start: int
    stop: int
    key_frame: int
    actors: tuple[Actor, ...]
    props: tuple[Prop, ...]
    things: tuple[Thing, ...]
    floor_y: float
    background_seed: int
    counter: Counter | None = None

    def actor(self, person_id: int) -> Actor:
        return next(a for a in self.actors if a.person_id == person_id)


@dataclass(frozen=True)
class VideoPlan:
    """Everything needed to render one video and write its annotations."""

    split: str
    index: int
    video_id: str
    width: int
    height: int
    num_frames: int
    episodes: tuple[Episode, ...]
    seed: int

    def episode_at(self, frame: int) -> Episode:
        e = min(max(0, (frame - FIRST_KEY_FRAME + EPISODE_LEAD) // EPISODE_FRAMES), len(self.episodes) - 1)
        return self.episodes[e]


@dataclass(frozen=True)
class Pose:
    """Joint positions (pixels, y down) of an actor at one frame."""

    head: Point
    head_r: float
    neck: Point
    shoulder: Point
    hip: Point
    elbow0: Point
    hand0: Point
    elbow1: Point
    hand1: Point
    knees: tuple[Point, Point]
    feet: tuple[Point, Point]
    facing: int
    limb_w: float
    torso_w: float

    def box(self) -> tuple[float, float, float, float]:
        """Tight pixel box x1 y1 x2 y2 of the drawn figure (head, limbs, torso, shoes)."""
        pts = [self.neck, self.shoulder, self.hip, self.elbow0, self.hand0, self.elbow1, self.hand1, *self.knees]
        pts += [(fx + self.facing * self.limb_w * 1.5, fy) for fx, fy in self.feet] + list(self.feet)
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        pad = self.limb_w / 2
        x1 = min(min(xs) - pad, self.head[0] - self.head_r, self.hip[0] - self.torso_w / 2)
        x2 = max(max(xs) + pad, self.head[0] + self.head_r, self.hip[0] + self.torso_w / 2)
        y1 = min(min(ys) - pad, self.head[1] - self.head_r)
        y2 = max(ys) + pad
        return x1, y1, x2, y2


# ----------------------------------------------------------------------------------------------- motion


def _smoothstep(t: float) -> float:
    t = min(1.0, max(0.0, t))
    return t * t * (3 - 2 * t)


def _limb(start: Point, angle: float, length: float, facing: int) -> Point:
    a = math.radians(angle)
    return start[0] + facing * length * math.sin(a), start[1] + length * math.cos(a)


def actor_x(actor: Actor, u: float) -> float:
    """Body axis x at ``u`` frames from the keyframe."""
    return actor.x + actor.facing * actor.speed * u


def raised(u: float) -> float:
    """How far the front arm of a counter actor is raised, 0 (rest) .. 1 (``ARM_SHOW`` at a glimpse centre); the same
    in every counter scene and symmetric about ``CHANGE``: ``raised(u) == raised(2 * CHANGE - u)``."""
    return max(_smoothstep(1 - abs(u - c) / RAISE_HALF) for c in GLIMPSES)


def pose_at(actor: Actor, u: float) -> Pose:
    """The actor's joints ``u`` frames after its episode's keyframe (negative before)."""
    h, f = actor.height, actor.facing
    x = actor_x(actor, u)
    t = u / ava.FPS
    gait = math.sin(2 * math.pi * actor.gait_hz * t + actor.gait_phase) if actor.posture == "walk" else 0.0
    if actor.posture == "sit":
        hip = (x, actor.ground_y - SEAT * h)
        knees = ((x + f * LEG_THIGH * h, hip[1]),) * 2
        feet = ((knees[0][0], actor.ground_y),) * 2
    else:
        bob = 0.012 * h * abs(gait)
        hip = (x, actor.ground_y - (LEG_THIGH + LEG_SHIN) * h + bob)
        if actor.posture == "walk":
            thighs = (25.0 * gait, -25.0 * gait)
            shins = tuple(a - 22.0 * max(0.0, -a / 25.0) for a in thighs)  # the trailing leg bends at the knee
        else:
            thighs = shins = (actor.stance, -actor.stance)
        knees = tuple(_limb(hip, a, LEG_THIGH * h, f) for a in thighs)
        feet = tuple(_limb(k, a, LEG_SHIN * h, f) for k, a in zip(knees, shins))
    neck = (hip[0], hip[1] - TORSO * h)
    head = (neck[0] + f * 0.01 * h, neck[1] - 0.03 * h - HEAD_R * h)
    shoulder = (neck[0], neck[1] + 0.03 * h)

    if actor.arm0 == "hold":
        a0 = ARM_HOLD
    elif actor.arm0 == "show":
        g = raised(u)
        a0 = tuple(r + g * (e - r) for r, e in zip(ARM_REST, ARM_SHOW))
    else:
        a0 = (ARM_REST[0] + 20.0 * gait, ARM_REST[1] + 20.0 * gait)
    elbow0 = _limb(shoulder, a0[0], ARM_UPPER * h, f)
    hand0 = _limb(elbow0, a0[1], ARM_FORE * h, f)

    if actor.arm1 == "rest":
        a1 = (ARM_REST[0] - 20.0 * gait, ARM_REST[1] - 20.0 * gait)
    else:
        swing = (
            math.sin(2 * math.pi * actor.wave_hz * t + actor.wave_phase) if actor.arm1 == "wave"
            else math.sin(actor.wave_phase)
        )
        a1 = (actor.raise_angle, 180.0 + actor.wave_amp * swing)
    elbow1 = _limb(shoulder, a1[0], ARM_UPPER * h, f)
    hand1 = _limb(elbow1, a1[1], ARM_FORE * h, f)
    return Pose(head=head, head_r=HEAD_R * h, neck=neck, shoulder=shoulder, hip=hip, elbow0=elbow0, hand0=hand0,
                elbow1=elbow1, hand1=hand1, knees=knees, feet=feet, facing=f,
                limb_w=max(2.0, round(0.065 * h)), torso_w=max(3.0, round(0.15 * h)))


def prop_hand(prop: Prop, u: float) -> int:
    """Person id of the actor whose front hand holds ``prop`` ``u`` frames after the keyframe; -1: nobody's."""
    if prop.changes:
        return prop.first if u < CHANGE else prop.then
    return prop.holder


def prop_center(prop: Prop, episode: Episode, u: float) -> Point:
    """Centre of a prop ``u`` frames after the keyframe: at the front hand that holds it (``prop_hand``), else where
    it lies (for a counter scene's prop: on the floor behind the counter)."""
    hand = prop_hand(prop, u)
    if hand >= 0:
        return pose_at(episode.actor(hand), u).hand0
    assert prop.at is not None
    return prop.at


def mirror_order(episode: Episode) -> Episode:
    """The same episode with its counter scene's events in the reverse order: every order actor gets the other class
    of its pair (giver <-> taker, picker <-> putter) and the prop's two places swap. Within the counter's columns
    (which nobody else enters) the mirror's frame ``u`` is the original's frame ``2 * CHANGE - u``."""
    actors = tuple(replace(a, role=OTHER_ROLE.get(a.role, a.role)) for a in episode.actors)
    props = tuple(replace(p, first=p.then, then=p.first) if p.changes else p for p in episode.props)
    return replace(episode, actors=actors, props=props)


def actor_actions(episode: Episode, actor: Actor) -> tuple[int, ...]:
    """The AVA action ids of ``actor`` at its episode's keyframe, from the class rules of the module docstring."""
    actions = {"stand": STAND, "sit": SIT, "walk": WALK}[actor.posture], *(
        [CARRY] if any(p.holder == actor.person_id for p in episode.props) else []
    ), *([WAVE] if actor.arm1 == "wave" else []), *([ROLE_ACTIONS[actor.role]] if actor.role in ROLE_ACTIONS else [])
    lo, hi = WATCH_RANGE
    for other in episode.actors:
        ahead = actor.facing * (actor_x(other, 0) - actor_x(actor, 0))
        if other.person_id != actor.person_id and lo * actor.height < ahead <= hi * actor.height:
            actions = (*actions, WATCH)
            break
    return tuple(sorted(actions))


def keyframe_boxes(video: VideoPlan, episode: Episode) -> list[tuple[Actor, tuple[float, float, float, float]]]:
    """(actor, normalised x1 y1 x2 y2 clipped to the frame) of every actor at the keyframe."""
    out = []
    for actor in episode.actors:
        x1, y1, x2, y2 = pose_at(actor, 0).box()
        out.append((actor, (max(0.0, x1) / video.width, max(0.0, y1) / video.height,
                            min(video.width, x2) / video.width, min(video.height, y2) / video.height)))
    return out


# ----------------------------------------------------------------------------------------------- planning

_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
_SPLIT_CODE = {"train": 1, "val": 2, "test": 3}
_PROP_COLORS = ((230, 60, 40), (250, 200, 30), (40, 170, 230), (60, 200, 90), (230, 90, 200), (250, 140, 30))
_SKINS = ((241, 194, 160), (224, 172, 130), (198, 134, 96), (141, 85, 54), (95, 60, 40))
_HAIRS = ((30, 20, 15), (90, 50, 20), (200, 170, 90), (60, 60, 60), (140, 40, 20))


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def video_ids(config: MiniAvaConfig) -> dict[str, list[str]]:
    """11-character ids of [A-Za-z0-9_-] per split; every third one starts with '-', as some AVA ids do."""
    rng = _rng(config.seed, 7)
    ids: list[str] = []
    while len(ids) < config.videos:
        chars = [_ALPHABET[i] for i in rng.integers(0, len(_ALPHABET), 11)]
        if len(ids) % 3 == 0:
            chars[0] = "-"
        vid = "".join(chars)
        if vid not in ids:
            ids.append(vid)
    n = config.split_videos
    return {"train": ids[:n["train"]], "val": ids[n["train"]:n["train"] + n["val"]],
            "test": ids[n["train"] + n["val"]:]}


def _color(rng: np.random.Generator, lo: int = 40, hi: int = 230) -> Color:
    return tuple(int(v) for v in rng.integers(lo, hi, 3))  # type: ignore[return-value]


def _shirt(rng: np.random.Generator) -> Color:
    """A saturated colour, so people stand out from the muted walls (posters compete with them)."""
    hue = rng.random()
    rgb = np.clip(np.abs((hue * 6 + np.array([0, 4, 2])) % 6 - 3) - 1, 0, 1)
    value, sat = rng.uniform(0.55, 0.95), rng.uniform(0.55, 0.9)
    return tuple(int(v) for v in 255 * value * (1 - sat + sat * rgb))  # type: ignore[return-value]


def plan_video(config: MiniAvaConfig, split: str, index: int) -> VideoPlan:
    """The scene description of video ``index`` of ``split`` (no pixels); a pure function of its arguments."""
    video_id = video_ids(config)[split][index]
    wide = (index + (split != "train")) % 2 == 0
    width, height = config.frame_size(wide)
    num_frames = config.seconds * ava.FPS
    rng = _rng(config.seed, _SPLIT_CODE[split], index, 1)
    episodes, next_pid = [], 0
    n_keys = config.keyframes_per_video
    for e in range(n_keys):
        key = FIRST_KEY_FRAME + EPISODE_FRAMES * e
        start = 0 if e == 0 else key - EPISODE_LEAD
        stop = num_frames if e == n_keys - 1 else key + EPISODE_FRAMES - EPISODE_LEAD
        episode = _plan_episode(rng, e, start, stop, key, width, height, next_pid)
        next_pid += len(episode.actors)
        episodes.append(episode)
    return VideoPlan(split=split, index=index, video_id=video_id, width=width, height=height, num_frames=num_frames,
                     episodes=tuple(episodes), seed=config.seed)


def _plan_episode(rng: np.random.Generator, e: int, start: int, stop: int, key: int, W: int, H: int,
                  first_pid: int) -> Episode:
    n_actors = int(rng.choice([2, 3, 4], p=[0.35, 0.4, 0.25])) if W > H * 1.5 else int(rng.choice([2, 3], p=[0.45, 0.55]))
    base_h = H * rng.uniform(0.42, 0.5)
    prop_size = max(3.0, 0.17 * base_h)
    u_lo, u_hi = start - key, stop - key - 1
    u_lo, u_hi = max(u_lo, -EPISODE_LEAD), min(u_hi, EPISODE_FRAMES - EPISODE_LEAD - 1)
    margin = 0.08 * W
    placed: list[dict] = []
    props: list[Prop] = []
    counter: Counter | None = None

    def person(**kw) -> dict:
        pid = first_pid + len(placed)
        look = dict(skin=_SKINS[rng.integers(len(_SKINS))], hair=_HAIRS[rng.integers(len(_HAIRS))],
                    shirt=_shirt(rng), pants=_color(rng, 20, 110))
        return dict(person_id=pid, **look, **kw)

    scene = rng.random()
    if scene < ORDER_EVENT_P["pair"] + ORDER_EVENT_P["single"]:  # a counter scene: a give/take pair or one actor
        pair = scene < ORDER_EVENT_P["pair"]
        h = base_h * rng.uniform(0.97, 1.03)
        half = PAIR_GAP / 2 * h if pair else 0.0
        reach = half + COUNTER_MARGIN * h
        cx = rng.uniform(margin + reach, W - margin - reach)
        gy = H * rng.uniform(0.9, 0.97)
        if pair:
            giver_left = rng.random() < 0.5
            for side in (-1, 1):
                role = "giver" if (side < 0) == giver_left else "taker"
                placed.append(person(posture="stand", facing=-side, x=cx + side * half, ground_y=gy, height=h,
                                     stance=rng.uniform(0, 8), arm0="show", role=role))
            placed[0]["partner"], placed[1]["partner"] = placed[1]["person_id"], placed[0]["person_id"]
            giver, taker = (placed[0], placed[1]) if giver_left else (placed[1], placed[0])
            first, then, at = giver["person_id"], taker["person_id"], None
        else:
            facing = int(rng.choice([-1, 1]))
            role = "picker" if rng.random() < 0.5 else "putter"
            placed.append(person(posture="stand", facing=facing, x=cx, ground_y=gy, height=h, stance=rng.uniform(0, 8),
                                 arm0="show", role=role))
            pid = placed[0]["person_id"]
            first, then = (-1, pid) if role == "picker" else (pid, -1)
            at = (cx + facing * 0.25 * h, gy - ORDER_PROP * h / 2)  # on the floor behind the counter
        props.append(Prop(kind=_prop_kind(rng), color=_PROP_COLORS[rng.integers(len(_PROP_COLORS))],
                          size=ORDER_PROP * h, first=first, then=then, at=at))
        shoulder = gy - (LEG_THIGH + LEG_SHIN + TORSO - 0.03) * h
        counter = Counter(cx - reach, cx + reach, shoulder + COUNTER_TOP * h, gy + 0.02 * h, _color(rng, 70, 170))

    for _ in range(200):
        if len(placed) >= n_actors:
            break
        h = base_h * rng.uniform(0.94, 1.06)
        posture = str(rng.choice(["stand", "sit", "walk"], p=[0.3, 0.25, 0.45]))
        facing = int(rng.choice([-1, 1]))
        speed = rng.uniform(0.35, 0.6) * h / ava.FPS if posture == "walk" else 0.0
        travel = (facing * speed * u_lo, facing * speed * u_hi)  # a walker stays inside the frame all episode
        lo, hi = max(margin, 0.05 * W - min(travel)), min(W - margin, 0.95 * W - max(travel))
        if lo >= hi:
            continue
        x = rng.uniform(lo, hi)
        min_gap = (0.75 if posture == "sit" else 0.6) * h
        if any(abs(x - p["x"]) < min_gap for p in placed):
            continue
        span = (facing * speed * (start - key), facing * speed * (stop - key - 1))  # the whole episode
        if counter is not None and (x + max(span) > counter.x1 - KEEP_OUT * h
                                    and x + min(span) < counter.x2 + KEEP_OUT * h):
            continue  # nobody else enters the counter's columns, all episode
        placed.append(person(posture=posture, facing=facing, x=x, ground_y=H * rng.uniform(0.9, 0.97), height=h,
                             speed=speed, gait_hz=rng.uniform(0.9, 1.3), gait_phase=rng.uniform(0, 2 * math.pi),
                             stance=rng.uniform(0, 10) if posture == "stand" else 0.0))

    things: list[Thing] = []
    floor_y = H * rng.uniform(0.5, 0.62)
    for p in placed:
        if p.get("role", "none") != "none":
            continue
        if rng.random() < 0.3:
            p["arm0"] = "hold"
            props.append(Prop(kind=_prop_kind(rng), color=_PROP_COLORS[rng.integers(len(_PROP_COLORS))],
                              size=prop_size, holder=p["person_id"]))
        else:
            if rng.random() < DISTRACTOR_P["hold_pose"]:
                p["arm0"] = "hold"
            if rng.random() < DISTRACTOR_P["prop_nearby"]:
                side = rng.choice([-1, 1])
                at = (float(np.clip(p["x"] + side * rng.uniform(0.25, 0.7) * p["height"], 3, W - 3)),
                      p["ground_y"] - prop_size / 2 - rng.uniform(0, 0.03 * H))
                props.append(Prop(kind=_prop_kind(rng), color=_PROP_COLORS[rng.integers(len(_PROP_COLORS))],
                                  size=prop_size, at=at))
        if rng.random() < 0.25:
            p["arm1"] = "wave"
        elif rng.random() < DISTRACTOR_P["raised_still"]:
            p["arm1"] = "raised"
        p.update(wave_hz=rng.uniform(2.0, 3.0), wave_phase=rng.uniform(0, 2 * math.pi),
                 wave_amp=rng.uniform(25, 40), raise_angle=rng.uniform(110, 135))
        if p["posture"] == "sit":
            things.append(Thing("stool", p["x"], p["ground_y"], SEAT * p["height"], _color(rng, 60, 160)))
    actors = tuple(Actor(**p) for p in placed)

    # Tall non-person things, often right where a person would make an actor a watcher.
    probe = Episode(e, 0, start, stop, key, actors, (), (), floor_y, 0)  # watch depends on the actors alone
    for a in actors:
        if WATCH not in actor_actions(probe, a) and rng.random() < 0.5:
            tx = actor_x(a, 0) + a.facing * rng.uniform(0.6, 1.8) * a.height
            if 0.05 * W < tx < 0.95 * W:
                things.append(_tall_thing(rng, tx, H, base_h))
    for _ in range(rng.integers(0, 3)):
        things.append(_tall_thing(rng, rng.uniform(0.05 * W, 0.95 * W), H, base_h))
    if rng.random() < 0.4:
        things.append(Thing("stool", rng.uniform(0.1 * W, 0.9 * W), H * rng.uniform(0.86, 0.95), SEAT * base_h,
                            _color(rng, 60, 160)))
    for _ in range(rng.integers(0, 3)):  # props lying around, away from anyone's hands
        props.append(Prop(kind=_prop_kind(rng), color=_PROP_COLORS[rng.integers(len(_PROP_COLORS))], size=prop_size,
                          at=(rng.uniform(0.05 * W, 0.95 * W), H * rng.uniform(0.8, 0.97))))
    things.sort(key=lambda t: t.ground_y)
    second = ava.FIRST_KEYFRAME + 3 * e
    return Episode(index=e, second=second, start=start, stop=stop, key_frame=key, actors=actors, props=tuple(props),
                   things=tuple(things), floor_y=floor_y, background_seed=int(rng.integers(2**31)), counter=counter)


def _prop_kind(rng: np.random.Generator) -> str:
    return str(rng.choice(["box", "ball", "bag"]))


def _tall_thing(rng: np.random.Generator, x: float, H: int, base_h: float) -> Thing:
    kind = str(rng.choice(["plant", "lamp", "rack", "tv"]))
    return Thing(kind, float(x), H * rng.uniform(0.8, 0.9), base_h * rng.uniform(0.75, 1.05), _color(rng, 30, 220))


# ----------------------------------------------------------------------------------------------- rendering


def _shade(c: Color, k: float) -> Color:
    return tuple(int(min(255, max(0, v * k))) for v in c)  # type: ignore[return-value]


def _background(episode: Episode, W: int, H: int) -> Image.Image:
    """Wall and floor textures, posters, shelves of clutter, tall things, stools and lying props (all static)."""
    rng = _rng(episode.background_seed)
    yy = np.arange(H)[:, None, None]
    wall = rng.uniform(90, 190) + rng.uniform(-25, 25, 3)
    floor = rng.uniform(60, 150) + rng.uniform(-25, 25, 3)
    low = Image.fromarray(rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)).resize((W, H), Image.BICUBIC)
    texture = (np.asarray(low, np.float32) - 128) * rng.uniform(0.1, 0.25)
    grain = rng.normal(0, rng.uniform(1.5, 4), (H, W, 1))
    img = np.where(yy < episode.floor_y, wall, floor) + texture + grain
    planks = max(3, int(rng.integers(4, 9)) * H // 90)
    floor_rows = (yy[:, 0, 0] >= episode.floor_y) & ((yy[:, 0, 0] - int(episode.floor_y)) % planks == 0)
    img[floor_rows] *= 0.8
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(2, 6)):  # posters and windows
        w, h = rng.uniform(0.08, 0.22) * W, rng.uniform(0.12, 0.3) * H
        x, y = rng.uniform(0, W - w), rng.uniform(0.02 * H, max(0.03 * H, episode.floor_y - h))
        c = _color(rng)
        draw.rectangle([x, y, x + w, y + h], fill=c, outline=_shade(c, 0.5))
        for k in range(rng.integers(0, 4)):
            yk = y + (k + 1) * h / 5
            draw.line([x + 1, yk, x + w - 1, yk], fill=_color(rng), width=1)
    for _ in range(rng.integers(0, 3)):  # a shelf with small things that nobody holds
        y = rng.uniform(0.15 * H, episode.floor_y - 2)
        x0 = rng.uniform(0, 0.7 * W)
        x1 = x0 + rng.uniform(0.15, 0.3) * W
        draw.line([x0, y, x1, y], fill=_color(rng, 40, 120), width=2)
        for _ in range(rng.integers(1, 4)):
            s = rng.uniform(2, 5) * H / 90
            cx = rng.uniform(x0, x1)
            _draw_prop(draw, _prop_kind(rng), (cx, y - s / 2 - 1), s, _PROP_COLORS[rng.integers(len(_PROP_COLORS))])
    for thing in episode.things:
        _draw_thing(draw, thing)
    for prop in episode.props:
        if prop.at is not None and not prop.changes:
            _draw_prop(draw, prop.kind, prop.at, prop.size, prop.color)
    return canvas


def _draw_counter(draw: ImageDraw.ImageDraw, c: Counter) -> None:
    draw.rectangle([c.x1, c.top, c.x2, c.bottom], fill=c.color, outline=_shade(c.color, 0.55))
    draw.line([c.x1, c.top + 1, c.x2, c.top + 1], fill=_shade(c.color, 1.25), width=1)


def _draw_thing(draw: ImageDraw.ImageDraw, t: Thing) -> None:
    x, g, h, c = t.x, t.ground_y, t.height, t.color
    lw = max(1, round(0.05 * h))
    if t.kind == "stool":
        draw.line([x - 0.5 * h, g - h, x + 0.5 * h, g - h], fill=c, width=max(2, lw))
        for dx in (-0.4 * h, 0.4 * h):
            draw.line([x + dx, g - h, x + 1.3 * dx, g], fill=_shade(c, 0.7), width=max(1, lw // 2 + 1))
        return
    if t.kind == "plant":
        draw.rectangle([x - 0.12 * h, g - 0.25 * h, x + 0.12 * h, g], fill=(150, 80, 50))
        for dx, dy, r in ((0, -0.55, 0.22), (-0.15, -0.4, 0.16), (0.15, -0.45, 0.17), (0, -0.8, 0.16)):
            cx, cy, rr = x + dx * h, g + dy * h, r * h
            draw.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=(40, int(110 + 60 * (c[1] / 255)), 50))
    elif t.kind == "lamp":
        draw.line([x, g, x, g - 0.85 * h], fill=(70, 70, 70), width=lw)
        draw.polygon([(x - 0.12 * h, g - 0.8 * h), (x + 0.12 * h, g - 0.8 * h), (x + 0.07 * h, g - h),
                      (x - 0.07 * h, g - h)], fill=c)
    elif t.kind == "rack":  # a coat rack: a person-sized pole with hooks and a coat
        draw.line([x, g, x, g - h], fill=(90, 60, 40), width=lw)
        draw.line([x - 0.12 * h, g, x + 0.12 * h, g], fill=(90, 60, 40), width=lw)
        draw.line([x - 0.1 * h, g - 0.9 * h, x + 0.1 * h, g - 0.9 * h], fill=(90, 60, 40), width=lw)
        draw.polygon([(x + 0.02 * h, g - 0.88 * h), (x + 0.14 * h, g - 0.5 * h), (x + 0.02 * h, g - 0.45 * h)], fill=c)
    else:  # tv on a stand
        draw.line([x, g, x, g - 0.55 * h], fill=(60, 60, 60), width=lw)
        draw.rectangle([x - 0.28 * h, g - 0.95 * h, x + 0.28 * h, g - 0.55 * h], fill=(25, 25, 25))
        draw.rectangle([x - 0.24 * h, g - 0.91 * h, x + 0.24 * h, g - 0.59 * h], fill=c)


def _draw_prop(draw: ImageDraw.ImageDraw, kind: str, center: Point, size: float, color: Color) -> None:
    x, y, r = center[0], center[1], size / 2
    if kind == "ball":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=color, outline=_shade(color, 0.55))
    elif kind == "bag":
        draw.rectangle([x - r, y - 0.6 * r, x + r, y + r], fill=color, outline=_shade(color, 0.55))
        draw.arc([x - 0.6 * r, y - 1.3 * r, x + 0.6 * r, y - 0.1 * r], 180, 360, fill=_shade(color, 0.55), width=1)
    else:
        draw.rectangle([x - r, y - r, x + r, y + r], fill=color, outline=_shade(color, 0.55))


def _draw_actor(draw: ImageDraw.ImageDraw, actor: Actor, p: Pose) -> None:
    lw, f = int(p.limb_w), p.facing
    sleeve_back = _shade(actor.shirt, 0.7)
    draw.line([p.shoulder, p.elbow1, p.hand1], fill=sleeve_back, width=lw, joint="curve")
    for k, (knee, foot) in enumerate(zip(p.knees, p.feet)):
        draw.line([p.hip, knee, foot], fill=_shade(actor.pants, 0.8 if k else 1.0), width=lw, joint="curve")
        draw.line([foot, (foot[0] + f * 1.5 * lw, foot[1])], fill=(20, 20, 20), width=lw)
    draw.line([p.neck, p.hip], fill=actor.shirt, width=int(p.torso_w))
    cx, cy, r = p.head[0], p.head[1], p.head_r
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=actor.skin)
    start, end = (100, 300) if f > 0 else (240, 440)  # hair on the back and the top: the facing side shows
    draw.pieslice([cx - r, cy - r, cx + r, cy + r], start, end, fill=actor.hair)
    draw.polygon([(cx + f * 0.8 * r, cy - 0.2 * r), (cx + f * 1.45 * r, cy + 0.25 * r), (cx + f * 0.8 * r, cy + 0.45 * r)],
                 fill=actor.skin)
    draw.point([(cx + f * 0.45 * r, cy - 0.15 * r)], fill=(10, 10, 10))
    draw.line([p.shoulder, p.elbow0, p.hand0], fill=actor.shirt, width=lw, joint="curve")
    draw.ellipse([p.hand0[0] - lw / 2, p.hand0[1] - lw / 2, p.hand0[0] + lw / 2, p.hand0[1] + lw / 2], fill=actor.skin)


def render_episode_frame(episode: Episode, background: Image.Image, frame: int) -> Image.Image:
    """The frame ``frame`` (0-based index in the video) of ``episode`` drawn over its static background."""
    img = background.copy()
    draw = ImageDraw.Draw(img)
    u = frame - episode.key_frame
    moving = [p for p in episode.props if p.at is None or p.changes]
    for actor in sorted(episode.actors, key=lambda a: (a.ground_y, a.person_id)):
        _draw_actor(draw, actor, pose_at(actor, u))
        for prop in moving:  # a held prop over its holder
            if prop_hand(prop, u) == actor.person_id:
                _draw_prop(draw, prop.kind, prop_center(prop, episode, u), prop.size, prop.color)
    if episode.counter is not None:  # a counter scene's prop on the floor, then the counter in front of it all
        for prop in moving:
            if prop_hand(prop, u) < 0:
                _draw_prop(draw, prop.kind, prop_center(prop, episode, u), prop.size, prop.color)
        _draw_counter(draw, episode.counter)
    return img


def render_frame(video: VideoPlan, frame: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB of 0-based frame ``frame`` before sensor noise and JPEG (for tests and figures)."""
    episode = video.episode_at(frame)
    return np.asarray(render_episode_frame(episode, _background(episode, video.width, video.height), frame))


def write_video_frames(video: VideoPlan, frames_dir: Path) -> int:
    """Render every frame of ``video`` into ``frames_dir/<vid>/<vid>_%06d.jpg``; returns the number written."""
    out = Path(frames_dir) / video.video_id
    out.mkdir(parents=True, exist_ok=True)
    rng = _rng(video.seed, _SPLIT_CODE[video.split], video.index, 4)
    noise = rng.normal(0, 2.5, (6, video.height, video.width, 1)).round().astype(np.int16)
    which = rng.integers(0, len(noise), video.num_frames)
    for episode in video.episodes:
        background = _background(episode, video.width, video.height)
        for frame in range(episode.start, episode.stop):
            img = np.asarray(render_episode_frame(episode, background, frame), dtype=np.int16) + noise[which[frame]]
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
                out / f"{video.video_id}_{frame + 1:06d}.jpg", format="JPEG", quality=JPEG_QUALITY)
    return video.num_frames


# ----------------------------------------------------------------------------------------------- annotations


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _fmt_box(b: Sequence[float]) -> str:
    return ",".join(f"{v:.3f}" for v in b)


def annotation_rows(video: VideoPlan) -> tuple[list[str], list[str]]:
    """(ground-truth lines, detector lines) of a video, without newlines, in keyframe then person order."""
    rng = _rng(video.seed, _SPLIT_CODE[video.split], video.index, 2)
    gt_lines, det_lines = [], []
    for episode in video.episodes:
        boxes = keyframe_boxes(video, episode)
        gt_boxes = []
        for actor, box in boxes:
            b = tuple(round(v, 3) for v in box)
            actions = actor_actions(episode, actor)
            gt_boxes.append((b, actions))
            gt_lines += [f"{video.video_id},{episode.second:04d},{_fmt_box(b)},{a},{actor.person_id}" for a in actions]
        dets: list[tuple[tuple[float, ...], float]] = []
        for b, _ in gt_boxes:
            if rng.random() < 0.05:
                continue
            w, h = b[2] - b[0], b[3] - b[1]
            j = rng.normal(0, DET_JITTER[video.split], 4) * np.array([w, h, w, h])
            d = (max(0.0, b[0] + j[0]), max(0.0, b[1] + j[1]), min(1.0, b[2] + j[2]), min(1.0, b[3] + j[3]))
            score = rng.uniform(0.5, 0.8) if rng.random() < 0.1 else 1 - 0.2 * rng.beta(1, 3)
            dets.append((d, score))
        for _ in range(rng.poisson(0.8)):  # false positives on tall things or clutter
            tall = [t for t in episode.things if t.kind != "stool"]
            if tall and rng.random() < 0.6:
                t = tall[rng.integers(len(tall))]
                cx, w, h, y2 = t.x / video.width, 0.5 * t.height / video.width, t.height / video.height, t.ground_y / video.height
                b = (cx - w / 2, y2 - h, cx + w / 2, y2)
            else:
                w, h = rng.uniform(0.08, 0.3), rng.uniform(0.2, 0.6)
                x, y = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
                b = (x, y, x + w, y + h)
            b = tuple(float(np.clip(v + rng.normal(0, 0.01), 0, 1)) for v in b)
            score = rng.uniform(0.8, 0.9) if rng.random() < 0.1 else rng.uniform(0.02, 0.6)
            dets.append((b, score))
        for d, score in dets:
            d = tuple(round(v, 3) for v in d)
            if d[2] <= d[0] or d[3] <= d[1]:
                continue
            actions: tuple[int, ...] = ()
            if video.split == "train":
                best = max(gt_boxes, key=lambda g: _iou(d, g[0]), default=None)
                if best is not None and _iou(d, best[0]) >= 0.9:
                    actions = best[1]
            prefix = f"{video.video_id},{episode.second:04d},{_fmt_box(d)}"
            det_lines += [f"{prefix},{a},{score:.6f}" for a in actions] or [f"{prefix},,{score:.6f}"]
    return gt_lines, det_lines


# ----------------------------------------------------------------------------------------------- the folder


def _marker(config: MiniAvaConfig) -> dict:
    return {"generator": "stctx mini-ava", "version": VERSION, "args": asdict(config)}


def is_complete(out: str | Path, config: MiniAvaConfig) -> bool:
    """Whether ``out`` holds a finished mini-AVA made with exactly ``config`` by this generator version."""
    marker = Path(out) / ".complete"
    try:
        return json.loads(marker.read_text()) == _marker(config)
    except (OSError, ValueError):
        return False


def generate_mini_ava(out: str | Path, videos: int | None = None, seconds: int | None = None, seed: int = 0,
                      tiny: bool = False, workers: int | None = None) -> Path:
    """Write a mini-AVA folder at ``out`` (see the module docstring) and return its path.

    ``videos``/``seconds`` default to 80/75 (``tiny``: 4/10). A folder already complete with the same arguments is
    left alone. The folder is built in a temporary sibling and renamed into place with its ``.complete`` marker
    written last, so an interrupted run leaves nothing at ``out``. ``workers`` (processes rendering whole videos,
    default: the CPU count, 1 for ``tiny``) changes no byte of the result.
    """
    config = MiniAvaConfig.make(videos, seconds, seed, tiny)
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out = Path(out)
    if is_complete(out, config):
        return out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = ("a mini-AVA made with other arguments or another generator version" if (out / ".complete").exists()
                else "other files")
        raise InputError(out, None, f"holds {what}; remove it or choose another folder")
    tmp = temporary_dir(out)  # removes what killed runs left (0.5 GB each at the default size)
    try:
        _write(tmp, config, workers)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_complete(out, config):  # another process finished the same dataset first
            return out
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write(root: Path, config: MiniAvaConfig, workers: int | None) -> None:
    paths = ava.AvaPaths(root)
    plans = {s: [plan_video(config, s, i) for i in range(n)] for s, n in config.split_videos.items()}
    every = [v for s in ava.SPLITS for v in plans[s]]
    workers = workers or (1 if config.tiny else min(len(every), os.cpu_count() or 1))
    paths.frames.mkdir(parents=True)
    if workers <= 1:
        for video in every:
            write_video_frames(video, paths.frames)
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            list(pool.map(write_video_frames, every, [paths.frames] * len(every)))

    (root / "frame_lists").mkdir()
    paths.detections("train").parent.mkdir(parents=True)
    shutil.copyfile(ava.SHIPPED_LABELMAP, paths.labelmap)
    for split in ava.SPLITS:
        with open(paths.frame_list(split), "w") as f:
            f.write(" ".join(ava.FRAME_LIST_HEADER) + "\n")
            for index, video in enumerate(plans[split]):
                vid = video.video_id
                f.writelines(f'{vid} {index} {k} {vid}/{vid}_{k + 1:06d}.jpg ""\n' for k in range(video.num_frames))
        gt, det = [], []
        for video in plans[split]:
            g, d = annotation_rows(video)
            gt += g
            det += d
        paths.groundtruth(split).write_text("".join(line + "\n" for line in gt))
        paths.detections(split).write_text("".join(line + "\n" for line in det))
        keys = [(v.video_id, e.second) for v in plans[split] for e in v.episodes]
        rng = _rng(config.seed, _SPLIT_CODE[split], 3)
        chosen = sorted(rng.choice(len(keys), max(1, round(0.03 * len(keys))), replace=False))
        paths.exclusions(split).write_text("".join(f"{keys[k][0]},{keys[k][1]:04d}\n" for k in chosen))
    (root / ".complete").write_text(json.dumps(_marker(config), indent=1, sort_keys=True) + "\n")
