"""``stctx predict INPUT --out DIR``: a trained model's action predictions on a video file, a frames folder or an AVA
split, written as an AVA predictions CSV with pictures of them.

The steps (``predict``, which the ``Predict`` task calls too):

1. Frames. A video file is decoded once into ``DIR/frames/<id>/`` at 30 fps from its start (``stctx ava frames``'
   procedure, ``pipeline.ava.frames.decode_video``; a rerun reuses the finished folder); a frames folder is read as
   it is (``<id>/*.jpg`` or the folder itself, 30 fps, its first frame at ``--first-second``); ``--split S`` reads
   the frames of an AVA folder (``--data``, by default the dataset the model was trained on), first frame second 900.
2. Keyframes: every ``--every`` seconds (1, AVA's rate) for a video or frames folder; a split's annotated keyframes
   minus its excluded ones; with ``--boxes``, the seconds the file gives.
3. Person boxes, with a score of at least ``--threshold`` (0.8, the paper's): ``--boxes DETS.csv`` (an AVA
   detections file; its rows for the input's videos), ``--detector CKPT`` (a torchvision Faster R-CNN whose weights
   are a file on disk, ``pipeline.predict.detector``; its boxes go to ``DIR/detections.csv`` for reuse with
   ``--boxes``), or, for a split, the split's detector boxes (what evaluation uses).
4. The model: an end-to-end checkpoint (``FinetuneEndToEnd``'s ``model.pt``, ``--model``), or a backbone checkpoint
   with a ``TrainHead`` ``head.pt`` (``--backbone``, ``--head``); by default the newest final model under the runs
   folder (``make demo``'s). Everything it needs is read from the file (configs, variant, sizes); a file of another
   kind, or a head that does not fit the backbone, is one clear error.
5. Outputs in DIR: ``predictions.csv`` (AVA layout: video, second, box, action id, score; the label map's classes,
   what ``stctx eval`` and the official evaluator read), ``videos/<id>.mp4`` (the annotated video: boxes, top
   actions with scores, a colour per person), ``contact_sheet.png`` (keyframes), and with ground truth at hand (a
   split) ``per_class_ap.png`` and ``metrics.json`` (frame-mAP@0.5). ``summary.json`` is written last: a run that
   fails leaves none, and every file before it is written whole or not at all.
"""

from __future__ import annotations

import argparse
import configparser
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence


from pipeline.ava import files as ava
from pipeline.errors import InputError
from pipeline.outputs import check_writable, write_json

DEFAULT_THRESHOLD = 0.8  # person boxes kept for prediction, the paper's (SlowFast's) detector threshold
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov")


@dataclass
class Source:
    """Where the frames of a prediction run are: ``frames_root/<video_id>/`` (or ``frame_lists``), 30 fps, frame 0
    showing ``first_second``; ``num_frames`` per video; the candidate ``keyframes`` (video, second), sorted; for an
    AVA split, its folder and name (ground truth at hand)."""

    frames_root: Path
    num_frames: dict[str, int]
    keyframes: list[tuple[str, int]]
    first_second: int
    frame_lists: Mapping[str, Sequence[str]] | None = None
    data_root: Path | None = None
    split: str | None = None
    description: str = ""
    excluded: set[str] = field(default_factory=set)
    _listed: dict[str, list[Path]] = field(default_factory=dict, repr=False)

    def frame_path(self, video_id: str, sec: int) -> Path:
        """The JPEG of keyframe ``sec`` of ``video_id``."""
        return self.frames(video_id)[(int(sec) - self.first_second) * ava.FPS]

    def frames(self, video_id: str) -> list[Path]:
        """The video's frame files in frame order, listed once (``frame_path`` asks for every keyframe)."""
        if video_id not in self._listed:
            self._listed[video_id] = ([self.frames_root / p for p in self.frame_lists[video_id]]
                                      if self.frame_lists is not None
                                      else sorted((self.frames_root / video_id).glob("*.jpg")))
        return self._listed[video_id]

    def has_keyframe(self, video_id: str, sec: int) -> bool:
        return video_id in self.num_frames and 0 <= (int(sec) - self.first_second) * ava.FPS < self.num_frames[video_id]


def every_keyframes(num_frames: Mapping[str, int], first_second: int, every: int) -> list[tuple[str, int]]:
    """Seconds ``first_second, first_second + every, ...`` of each video that has a frame there."""
    if every < 1:
        raise ValueError(f"--every must be a whole number of seconds >= 1 (the AVA layout stores seconds), got {every}")
    keys = []
    for video_id, n in sorted(num_frames.items()):
        last = first_second + (n - 1) // ava.FPS
        keys += [(video_id, s) for s in range(first_second, last + 1, every)]
    return keys


def video_source(video: Path, work: Path, every: int = 1, progress: bool = False) -> Source:
    """Decode ``video`` into ``work/frames/<stem>/`` (once: a finished folder is reused) at 30 fps from its start."""
    from pipeline.ava.frames import decode_video
    from pipeline.progress import progress as progress_bar

    video_id = video.stem
    folder = work / "frames" / video_id
    if not (folder.is_dir() and any(folder.glob("*.jpg"))):
        seconds = video_seconds(video)
        with progress_bar(total=int(round(seconds * ava.FPS)), unit="frame", desc=f"decoding {video.name}",
                          disable=not progress) as bar:
            try:
                decode_video(video, folder, start=0.0, end=seconds + 1.0, progress=bar)
            finally:
                shutil.rmtree(folder.with_name(folder.name + ".partial"), ignore_errors=True)
    n = len(list(folder.glob("*.jpg")))
    return Source(folder.parent, {video_id: n}, every_keyframes({video_id: n}, 0, every), 0,
                  description=f"video {video} ({n} frames at {ava.FPS} fps)")


def video_seconds(video: Path) -> float:
    """The duration of ``video`` in seconds (container, else stream metadata); an unreadable file is an InputError."""
    import av

    try:
        with av.open(str(video)) as container:
            if not container.streams.video:
                raise InputError(video, None, "no video stream in this file")
            stream = container.streams.video[0]
            if container.duration:
                return container.duration / 1_000_000
            if stream.duration and stream.time_base:
                return float(stream.duration * stream.time_base)
            frames = stream.frames or sum(1 for _ in container.decode(stream))
            rate = stream.average_rate or ava.FPS
            return frames / float(rate)
    except (av.FFmpegError, OSError) as err:
        raise InputError(video, None, f"cannot read video: {err}") from None


def frames_source(folder: Path, first_second: int = 0, every: int = 1) -> Source:
    """A folder of one video's JPEG frames (``folder/*.jpg``), or of several (``folder/<id>/*.jpg``), at 30 fps."""
    if any(folder.glob("*.jpg")):
        root, videos = folder.parent, {folder.name: len(list(folder.glob("*.jpg")))}
    else:
        root = folder
        videos = {p.name: len(list(p.glob("*.jpg"))) for p in sorted(folder.iterdir())
                  if p.is_dir() and not p.name.endswith(".partial")}
        videos = {k: n for k, n in videos.items() if n}
    if not videos:
        raise InputError(folder, None, "no .jpg frames here (expected FOLDER/*.jpg or FOLDER/<video_id>/*.jpg)")
    return Source(root, videos, every_keyframes(videos, first_second, every), first_second,
                  description=f"frames {folder} ({len(videos)} video(s), first frame at second {first_second})")


def split_source(data_root: Path, split: str) -> Source:
    """The frames and annotated keyframes of an AVA folder's split (excluded keyframes left out)."""
    from pipeline.ava.splits import split_keyframes

    paths = ava.AvaPaths(data_root)
    if split not in ava.present_splits(data_root):
        raise InputError(data_root, None, f"no split {split!r} here (splits: {', '.join(ava.present_splits(data_root))})")
    frame_list = paths.frame_list(split)
    lists = ava.frames_by_video(ava.read_frame_list(frame_list)) if frame_list.exists() else None
    excluded = ava.read_exclusions(paths.exclusions(split)) if paths.exclusions(split).exists() else set()
    keys = [k for k in split_keyframes(data_root, split) if ava.make_key(*k) not in excluded]
    videos = sorted({v for v, _ in keys})
    if lists is not None:
        missing = [v for v in videos if v not in lists]
        if missing:
            raise InputError(frame_list, None, f"videos of split {split} missing from the frame list: {missing[:5]}")
        num_frames = {v: len(lists[v]) for v in videos}
    else:
        num_frames = {v: len(list((paths.frames / v).glob("*.jpg"))) for v in videos}
    return Source(paths.frames, num_frames, keys, ava.FIRST_SECOND, lists, Path(data_root), split,
                  description=f"split {split} of {data_root}", excluded=excluded)


# ----------------------------------------------------------------------------------------------- boxes


def boxes_from_csv(path: Path, source: Source, threshold: float):
    """``cache.boxes.KeyframeBoxes`` of an AVA detections file's rows for the source's videos with score >=
    ``threshold``. A file with no rows for those videos, or rows at seconds the videos do not have, is an error."""
    from pipeline.ava.proposals import eval_proposals

    rows = ava.read_detections(path).frame()
    mine = rows[rows["video_id"].isin(list(source.num_frames))]
    if mine.empty:
        theirs = sorted(set(rows["video_id"]))
        raise InputError(path, None, f"no boxes for {', '.join(sorted(source.num_frames)[:5])} (this file has boxes "
                                     f"of {len(theirs)} other video(s): {', '.join(theirs[:5])})")
    outside = [(v, int(s)) for v, s in zip(mine["video_id"], mine["timestamp"]) if not source.has_keyframe(v, s)]
    if outside:
        v, s = outside[0]
        raise InputError(path, None, f"{len(outside)} row(s) at seconds the video has no frame for, e.g. {v} second "
                                     f"{s} ({source.num_frames[v]} frames from second {source.first_second})")
    mine = mine[[ava.make_key(v, s) not in source.excluded for v, s in zip(mine["video_id"], mine["timestamp"])]]
    return eval_proposals(mine, threshold)


def boxes_from_detector(checkpoint: Path, source: Source, threshold: float, out: Path, *, device="cpu",
                        min_size: int = 800, progress: bool = False):
    """Person boxes of every candidate keyframe from a Faster R-CNN checkpoint; written to ``out/detections.csv``."""
    from pipeline.ava.proposals import eval_proposals
    from pipeline.predict.detector import detect_keyframes, detections_rows, load_person_detector

    model = load_person_detector(checkpoint, device, min_size=min_size)
    frame = detect_keyframes(model, source.frame_path, source.keyframes, threshold=threshold, progress=progress)
    ava.write_detections(detections_rows(frame), out / "detections.csv")
    return eval_proposals(frame, threshold)


# ----------------------------------------------------------------------------------------------- model


def runs_root(config: str | Path | None = None) -> Path:
    """The pipeline's runs folder: ``[stctx] root`` of the Luigi config (``LUIGI_CONFIG_PATH``, else ./luigi.cfg),
    else ``runs``; read as a plain INI file (this module does not import Luigi)."""
    config = Path(config or os.environ.get("LUIGI_CONFIG_PATH") or "luigi.cfg")
    parser = configparser.ConfigParser()
    if config.is_file():
        parser.read(config)
    return Path(parser.get("stctx", "root", fallback="runs"))


def final_model(root: Path) -> Path:
    """The newest finished end-to-end model under ``root`` (``<root>/end_to_end/*/seed-*/model.pt`` beside its
    ``metrics.json``, which is written last): the final model of ``make demo``."""
    done = sorted((root / "end_to_end").glob("*/seed-*/metrics.json"), key=lambda p: p.stat().st_mtime)
    done = [p.parent / "model.pt" for p in done if (p.parent / "model.pt").is_file()]
    if not done:
        raise InputError(root / "end_to_end", None, "no finished end-to-end model here: run `make demo` first, or "
                                                    "pass --model MODEL.pt (or --backbone and --head)")
    return done[-1]


def load_model(model: Path | None = None, backbone: Path | None = None, head: Path | None = None,
               root: Path | None = None, device="cpu"):
    """(ContextDetector, meta, path description): ``model`` (an end-to-end checkpoint), or ``backbone`` + ``head``,
    or the newest final model under ``root`` (``final_model``)."""
    from pipeline.features.checkpoints import read_torch_file
    from pipeline.training.end_to_end import CHECKPOINT_FORMAT, build_end_to_end, load_end_to_end

    if (backbone is None) != (head is None):
        raise InputError(None, None, "--backbone and --head go together (a backbone checkpoint and a TrainHead head.pt)")
    if backbone is not None:
        if model is not None:
            raise InputError(None, None, "give --model or --backbone with --head, not both")
        try:
            detector = build_end_to_end(backbone, head, device)
        except ValueError as err:  # sizes that do not fit
            raise InputError(head, None, str(err)) from None
        return detector, {}, f"backbone {backbone} + head {head}"
    model = Path(model) if model is not None else final_model(root or runs_root())
    ckpt = read_torch_file(model, "model checkpoint")
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    if fmt != CHECKPOINT_FORMAT:
        kind = ("a TrainHead head.pt" if isinstance(ckpt, dict) and "head_config" in ckpt and "backbone_state" not in ckpt
                else "a backbone checkpoint" if isinstance(ckpt, dict) and ("model_state" in ckpt or "state" in ckpt)
                else "not a checkpoint stctx knows")
        raise InputError(model, None, f"not an end-to-end model ({kind}); --model takes FinetuneEndToEnd's model.pt, "
                                      "--backbone with --head take a backbone checkpoint and a head.pt")
    del ckpt
    detector, meta = load_end_to_end(model, device)
    return detector, meta, f"model {model}"


def labelmap_for(source: Source, meta: Mapping, labelmap: Path | None) -> dict[int, str]:
    """The action names: ``--labelmap``, else the split's label map, else the one the model was trained with
    (``meta['labelmap']``), else AVA v2.2's."""
    if labelmap is not None:
        return ava.read_labelmap(labelmap)
    if source.data_root is not None:
        return ava.read_labelmap(ava.AvaPaths(source.data_root).labelmap)
    if meta.get("labelmap"):
        return {int(k): str(v) for k, v in meta["labelmap"].items()}
    return ava.read_labelmap(ava.SHIPPED_LABELMAP)


# ----------------------------------------------------------------------------------------------- the run


def predict(out: str | Path, *, video: Path | None = None, frames: Path | None = None, split: str | None = None,
            data_root: Path | None = None, first_second: int = 0, every: int = 1, boxes: Path | None = None,
            detector: Path | None = None, detector_size: int = 800, threshold: float = DEFAULT_THRESHOLD,
            model: Path | None = None, backbone: Path | None = None, head: Path | None = None,
            root: Path | None = None, labelmap: Path | None = None, device: str | None = None, batch_size: int = 8,
            videos: int | None = None, top: int = 3, min_score: float = 0.1, progress: bool = True) -> dict:
    """One prediction run into ``out`` (module docstring); returns the summary that ``out/summary.json`` holds.

    Exactly one of ``video``, ``frames``, ``split``. ``videos``: how many annotated MP4s (the first videos in
    order; default all of a video file or frames folder, 1 of a split; 0: none). ``top``/``min_score``: the actions
    drawn per box. ``device``: None is CUDA when available, else the CPU."""
    from pipeline.features.runtime import resolve_device
    from pipeline.predict.render import Predictions, annotated_video, contact_sheet
    from pipeline.training.end_to_end import predict_boxes

    start = time.perf_counter()
    if sum(x is not None for x in (video, frames, split)) != 1:
        raise InputError(None, None, "give one input: a video file, a frames folder, or --split")
    if boxes is not None and detector is not None:
        raise InputError(None, None, "give --boxes or --detector, not both")
    if not 0.0 <= threshold <= 1.0:
        raise InputError(None, None, f"--threshold must be in [0, 1], got {threshold}")
    out = check_writable(Path(out))
    (out / "summary.json").unlink(missing_ok=True)  # a run that fails must not leave the last one's marker
    device = resolve_device(device)

    # the model first: a wrong file fails before any decoding
    detector_model, meta, model_text = load_model(model, backbone, head, root, device)

    if video is not None:
        video = Path(video)
        if not video.is_file():
            raise InputError(video, None, "video file not found")
        source = video_source(video, out, every, progress)
    elif frames is not None:
        frames = Path(frames)
        if not frames.is_dir():
            raise InputError(frames, None, "frames folder not found")
        source = frames_source(frames, first_second, every)
    else:
        data_root = Path(data_root) if data_root is not None else _model_data_root(meta, model_text)
        source = split_source(data_root, split)

    if boxes is not None:
        proposals, box_text = boxes_from_csv(Path(boxes), source, threshold), f"boxes {boxes}"
    elif detector is not None:
        proposals = boxes_from_detector(Path(detector), source, threshold, out, device=device,
                                        min_size=detector_size, progress=progress)
        box_text = f"detector {detector} -> {out / 'detections.csv'}"
    elif source.split is not None:
        from pipeline.ava.splits import split_proposals
        from pipeline.training.end_to_end import drop_keyframes

        proposals = drop_keyframes(split_proposals(source.data_root, source.split, threshold), source.excluded)
        box_text = f"the detector boxes of split {source.split}"
    else:
        raise InputError(None, None, "person boxes needed: --boxes DETS.csv (AVA detections layout) or --detector "
                                     "CKPT (a torchvision Faster R-CNN file)")
    if not len(proposals.video_ids):
        raise InputError(boxes or detector, None, f"no person box with score >= {threshold} on any keyframe")

    names = labelmap_for(source, meta, labelmap)
    vids, secs, bxs, scores = predict_boxes(detector_model, source.frames_root, proposals,
                                            frame_lists=source.frame_lists, first_second=source.first_second,
                                            device=device, batch_size=batch_size, progress=progress)
    pred = Predictions(vids, secs, bxs, scores)
    write_predictions(out / "predictions.csv", pred, names)

    summary = {"input": source.description, "model": model_text, "variant": detector_model.config.name,
               "boxes": box_text, "threshold": threshold, "keyframes": int(len(proposals.video_ids)),
               "boxes_predicted": len(pred.video_ids), "videos": sorted(set(pred.video_ids)),
               "predictions": str(out / "predictions.csv")}
    if source.split is not None:
        summary |= evaluate(out, source, pred)

    sheet = contact_sheet(source.frame_path, pred, names, out / "contact_sheet.png", top=top,
                          min_score=min_score, title=f"{detector_model.config.name}: {source.description}")
    summary["contact_sheet"] = str(sheet)
    count = (1 if source.split is not None else len(source.num_frames)) if videos is None else videos
    summary["annotated_videos"] = []
    for video_id in sorted(set(pred.video_ids))[:count]:
        path = annotated_video(source.frames(video_id), pred.of_video(video_id), names,
                               out / "videos" / f"{video_id}.mp4", first_second=source.first_second, top=top,
                               min_score=min_score, progress=progress)
        summary["annotated_videos"].append(str(path))
    summary["seconds"] = round(time.perf_counter() - start, 2)
    write_json(out / "summary.json", summary, indent=2)
    return summary


def _model_data_root(meta: Mapping, model_text: str) -> Path:
    root = meta.get("data_root")
    if not root or not Path(root).is_dir():
        raise InputError(None, None, f"--split needs the AVA folder: pass --data DIR ({model_text} does not name the "
                                     "folder it was trained on, or that folder is gone)")
    return Path(root)


def write_predictions(path: Path, pred, labelmap: Mapping[int, str]) -> Path:
    """``pred`` as an AVA detections CSV: one row per box and label-map class (video, second, box, action id, score),
    box-major; floats in their shortest round-trip form (``write_detections``), so scoring the file gives the same
    frame-mAP as scoring the arrays."""
    from pipeline.training.head import label_map_detections

    classes = [k for k in labelmap if 1 <= k <= pred.scores.shape[1]]
    return ava.write_detections(label_map_detections(pred.video_ids, pred.secs, pred.boxes, pred.scores, classes), path)


def evaluate(out: Path, source: Source, pred) -> dict:
    """Frame-mAP@0.5 of the predictions against the split's ground truth -> ``metrics.json`` and
    ``per_class_ap.png`` in ``out``; returns the summary's fields."""
    from pipeline.ava.evaluation import plot_per_class
    from pipeline.ava.splits import annotations
    from pipeline.training.head import frame_map

    files = annotations(source.data_root, source.split)
    result = frame_map(pred.video_ids, pred.secs, pred.boxes, pred.scores, groundtruth=files["groundtruth"],
                       labelmap=files["labelmap"], exclusions=files["exclusions"])
    write_json(out / "metrics.json", {"split": source.split, **result.to_json()})
    tmp = out / ".per_class_ap.partial.png"
    plot_per_class(result, tmp)
    os.replace(tmp, out / "per_class_ap.png")
    return {"mAP": result.mAP, "metrics": str(out / "metrics.json"), "per_class_plot": str(out / "per_class_ap.png")}


# ----------------------------------------------------------------------------------------------- CLI


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", nargs="?", metavar="INPUT",
                        help="a video file or a frames folder (FOLDER/*.jpg or FOLDER/<video_id>/*.jpg, 30 fps); "
                             "or --split")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    parser.add_argument("--split", help="a split of the AVA folder (--data) instead of INPUT, e.g. val")
    parser.add_argument("--data", type=Path, metavar="DIR",
                        help="the AVA folder of --split (default: the folder the model was trained on)")
    parser.add_argument("--every", type=int, default=1, metavar="SECONDS", help="keyframe spacing (default 1, AVA's)")
    parser.add_argument("--first-second", type=int, default=0,
                        help="the second a frames folder's first frame shows (default 0; AVA frames: 900)")
    boxes = parser.add_argument_group("person boxes (one of; a split has its own detector boxes)")
    boxes.add_argument("--boxes", type=Path, metavar="DETS.csv", help="an AVA detections CSV")
    boxes.add_argument("--detector", type=Path, metavar="CKPT",
                       help="torchvision fasterrcnn_resnet50_fpn weights on disk (COCO person class)")
    boxes.add_argument("--detector-size", type=int, default=800, help="the detector's input short side (default 800)")
    boxes.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                       help=f"person box score threshold (default {DEFAULT_THRESHOLD}, the paper's)")
    model = parser.add_argument_group("model (default: the newest final model of the runs folder, `make demo`'s)")
    model.add_argument("--model", type=Path, metavar="MODEL.pt", help="a FinetuneEndToEnd model.pt")
    model.add_argument("--backbone", type=Path, help="a backbone checkpoint (with --head)")
    model.add_argument("--head", type=Path, metavar="HEAD.pt", help="a TrainHead head.pt (with --backbone)")
    model.add_argument("--runs", type=Path, help="the runs folder (default: [stctx] root of luigi.cfg, else runs)")
    parser.add_argument("--labelmap", type=Path, help="action names (.pbtxt; default: the split's, the model's, AVA's)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    parser.add_argument("--batch-size", type=int, default=8, help="clips per forward pass (default 8)")
    parser.add_argument("--videos", type=int, default=None,
                        help="annotated MP4s to write (default: every video of INPUT, 1 of a split; 0: none)")
    parser.add_argument("--top", type=int, default=3, help="actions drawn per person (default 3)")
    parser.add_argument("--min-score", type=float, default=0.1, help="smallest score drawn (default 0.1)")


def run_cli(args) -> int:
    if (args.input is None) == (args.split is None):
        raise InputError(None, None, "give INPUT (a video file or frames folder) or --split S, not both")
    video = frames = None
    if args.input is not None:
        path = Path(args.input)
        if path.is_dir():
            frames = path
        elif path.suffix.lower() in VIDEO_SUFFIXES or path.is_file():
            video = path
        else:
            raise InputError(path, None, "no such video file or frames folder")
    summary = predict(args.out, video=video, frames=frames, split=args.split, data_root=args.data,
                      first_second=args.first_second, every=args.every, boxes=args.boxes, detector=args.detector,
                      detector_size=args.detector_size, threshold=args.threshold, model=args.model,
                      backbone=args.backbone, head=args.head, root=args.runs, labelmap=args.labelmap,
                      device=args.device, batch_size=args.batch_size, videos=args.videos, top=args.top,
                      min_score=args.min_score)
    mAP = f", frame-mAP@0.5 {100 * summary['mAP']:.2f}" if summary.get("mAP") is not None else ""
    print(f"{summary['boxes_predicted']} boxes on {summary['keyframes']} keyframes of {len(summary['videos'])} "
          f"video(s){mAP} -> {args.out}/predictions.csv ({summary['model']})")
    for key in ("contact_sheet", "per_class_plot"):
        if key in summary:
            print(f"  {summary[key]}")
    for path in summary["annotated_videos"]:
        print(f"  {path}")
    return 0
