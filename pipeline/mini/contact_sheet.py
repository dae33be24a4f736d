"""A contact sheet of an AVA folder: a few keyframes with their ground-truth boxes and action names, and one
give/take clip as a strip of frames (the object's motion is what tells the two apart).

Made for ``docs/mini-ava.png`` by ``stctx mini-ava runs/mini-ava --contact-sheet docs/mini-ava.png``; it reads only
the files of the folder, so it works on any AVA layout (real AVA too, minus the strip when nobody gives).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from pipeline.ava import files as ava
from pipeline.mini.generator import GIVE, SHORT_NAMES, TAKE

BOX_COLORS = ((255, 230, 0), (0, 230, 255), (255, 80, 200), (120, 255, 80), (255, 140, 0))
STRIP_OFFSETS = (-30, -19, 0, 17, 30)  # frames from the keyframe: the two raises of the counter scenes (GLIMPSES)


def contact_sheet(root: str | Path, out_png: str | Path, split: str = "val", tiles: int = 6, columns: int = 3,
                  cell: tuple[int, int] = (480, 270)) -> Path:
    """Draw ``tiles`` keyframes of ``split`` (chosen to cover as many actions and frame shapes as possible) and a
    strip of a give/take clip into ``out_png``; returns its path."""
    paths = ava.AvaPaths(root)
    names = ava.read_labelmap(paths.labelmap)
    gt = ava.read_groundtruth(paths.groundtruth(split)).frame()
    keys = list(gt.groupby(["video_id", "timestamp"], sort=False))
    chosen = _cover(keys, tiles)
    font = _font(14)
    rows = -(-len(chosen) // columns)
    strip_key = next(((k, g) for k, g in keys if (g["action_id"] == GIVE).any()), None)
    strip_h = 0
    if strip_key is not None:
        first = _frame(paths, strip_key[0][0], 0)
        strip_h = round(first.height * cell[0] * columns / len(STRIP_OFFSETS) / first.width) + 22
    sheet = Image.new("RGB", (cell[0] * columns, cell[1] * rows + strip_h), (0, 0, 0))
    for n, ((video_id, sec), rows_of_key) in enumerate(chosen):
        tile = _keyframe_tile(paths, video_id, int(sec), rows_of_key, names, cell, font)
        sheet.paste(tile, ((n % columns) * cell[0] + (cell[0] - tile.width) // 2, (n // columns) * cell[1]))
    if strip_key is not None:
        (video_id, sec), rows_of_key = strip_key
        _draw_strip(sheet, paths, video_id, int(sec), rows_of_key, cell[1] * rows, font)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png, format="PNG", optimize=True)
    return out_png


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the bitmap font
        return ImageFont.load_default()


def _cover(keys: list, count: int) -> list:
    """Greedy pick: each next keyframe adds the most actions not shown yet (ties: the earlier keyframe)."""
    chosen, seen, shapes = [], set(), set()
    pool = list(keys)
    while pool and len(chosen) < count:
        def gain(item):
            (video_id, _), g = item
            return len(set(g["action_id"]) - seen), video_id not in shapes
        best = max(pool, key=gain)
        pool.remove(best)
        chosen.append(best)
        seen |= set(best[1]["action_id"])
        shapes.add(best[0][0])
    return chosen


def _frame(paths: ava.AvaPaths, video_id: str, index: int) -> Image.Image:
    return Image.open(paths.frame_path(video_id, index + 1)).convert("RGB")


def _boxes(rows) -> list[tuple[tuple[float, float, float, float], list[int]]]:
    out: dict[tuple, list[int]] = {}
    for r in rows.itertuples():
        out.setdefault((r.x1, r.y1, r.x2, r.y2), []).append(int(r.action_id))
    return list(out.items())


def _keyframe_tile(paths, video_id, sec, rows, names, cell, font) -> Image.Image:
    img = _frame(paths, video_id, ava.keyframe_frame_index(sec))
    scale = min(cell[0] / img.width, cell[1] / img.height)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    for k, (box, actions) in enumerate(_boxes(rows)):
        color = BOX_COLORS[k % len(BOX_COLORS)]
        x1, y1, x2, y2 = box[0] * img.width, box[1] * img.height, box[2] * img.width, box[3] * img.height
        draw.rectangle([x1, y1, x2, y2], outline=color, width=2)
        for j, a in enumerate(sorted(actions)):
            text = SHORT_NAMES.get(a, names.get(a, str(a)))
            ty = y1 + 2 + 15 * j if k % 2 else max(0, y1 - 15 * (len(actions) - j))
            tw = draw.textlength(text, font=font)
            tx = min(max(0, x1), img.width - tw - 2)
            draw.rectangle([tx, ty, tx + tw + 2, ty + 14], fill=(0, 0, 0))
            draw.text((tx + 1, ty), text, fill=color, font=font)
    draw.text((4, img.height - 18), f"{video_id} @ {sec}", fill=(255, 255, 255), font=font, stroke_width=2,
              stroke_fill=(0, 0, 0))
    return img


def _draw_strip(sheet: Image.Image, paths, video_id, sec, rows, top, font) -> None:
    """Frames ``STRIP_OFFSETS`` around a give/take keyframe, boxes of the giver and the taker drawn on each."""
    width = sheet.width // len(STRIP_OFFSETS)
    draw = ImageDraw.Draw(sheet)
    draw.text((4, top + 2), f"give/take clip {video_id} @ {sec}, frames around the keyframe: both raise a hand at -19 "
              "and +17; the object is in the giver's hand at the first raise and in the taker's at the second",
              fill=(255, 255, 255), font=font)
    key = ava.keyframe_frame_index(sec)
    roles = [(box, GIVE in acts) for box, acts in _boxes(rows) if GIVE in acts or TAKE in acts]
    for n, du in enumerate(STRIP_OFFSETS):
        img = _frame(paths, video_id, key + du)
        img = img.resize((width, round(img.height * width / img.width)), Image.NEAREST)
        d = ImageDraw.Draw(img)
        for box, giver in roles:
            x1, y1, x2, y2 = box[0] * img.width, box[1] * img.height, box[2] * img.width, box[3] * img.height
            color = BOX_COLORS[0] if giver else BOX_COLORS[1]
            d.rectangle([x1, y1, x2, y2], outline=color, width=1)
            d.text((x1 + 2, y1 + 1), "give" if giver else "take", fill=color, font=font)
        d.text((4, img.height - 18), f"{du:+d}", fill=(255, 255, 255), font=font, stroke_width=2, stroke_fill=(0, 0, 0))
        sheet.paste(img, (n * width, top + 22))
