"""Table 1: frame-mAP per head variant over seeds, the paper's numbers beside ours, and the classes where
context matters. Writes ``table1.md``, ``table1.csv`` and ``table1.png``.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from pipeline.outputs import atomic_file, built_dir, write_text

# Classes whose evidence lies outside the actor box or in the order of events (AVA action ids).
CONTEXT_CLASSES: dict[int, str] = {
    65: "give/serve (an object) to (a person)",
    78: "take (an object) from (a person)",
    36: "lift/pick up",
    47: "put down",
    17: "carry/hold (an object)",
    80: "watch (a person)",
    69: "hand wave",
}


def ablation_frame(results: Sequence[Mapping], paper: Mapping[str, float], order: Sequence[str],
                   blind: Mapping[int, float] | None = None) -> pd.DataFrame:
    """One row per variant: ``variant, split, map_mean, map_std, n_seeds, paper_map`` (mAP in percent), then the
    mean AP (percent) of each context class as ``ap_<id>``.

    ``results`` are metrics dicts of single runs: ``variant``, ``seed``, ``mAP`` (a fraction), ``per_class``
    (``{"<id>": AP fraction or None}``) and ``split``, the split evaluated (``val`` when absent: ``TrainHead``'s own
    evaluation); the runs of one variant must share it. Runs evaluated on another split that carry ``val_mAP`` (the
    split their defaults were chosen on) add ``val_map_mean``. ``blind``: the direction-blind AP (percent) of each class of the dataset's
    order pairs (``pipeline.ava.bounds``); with it the rows also have ``temporal_ap`` (mean over seeds of the runs'
    mean AP over those classes), ``temporal_ap_std`` (over seeds) and ``temporal_ap_blind`` (the bound's mean over
    the classes, the same on every row).
    """
    rows = []
    for name in order:
        runs = [r for r in results if r["variant"] == name]
        if not runs:
            continue
        maps = np.array([100.0 * r["mAP"] for r in runs])
        splits = sorted({r.get("split", "val") for r in runs})
        if len(splits) != 1:
            raise ValueError(f"the runs of {name} were evaluated on different splits: {splits}")
        row = {
            "variant": name,
            "split": splits[0],
            "map_mean": maps.mean(),
            "map_std": maps.std(ddof=1) if len(maps) > 1 else 0.0,
            "n_seeds": len(runs),
            "paper_map": paper.get(name, math.nan),
            "seeds": " ".join(str(r["seed"]) for r in runs),
        }
        if splits[0] != "val" and all(r.get("val_mAP") is not None for r in runs):
            row["val_map_mean"] = float(np.mean([100.0 * r["val_mAP"] for r in runs]))
        for class_id in CONTEXT_CLASSES:
            aps = [r["per_class"].get(str(class_id)) for r in runs]
            aps = [100.0 * a for a in aps if a is not None]
            row[f"ap_{class_id}"] = float(np.mean(aps)) if aps else math.nan
        if blind:
            per_run = np.array([np.mean([100.0 * (r["per_class"].get(str(c)) or 0.0) for c in blind]) for r in runs])
            row["temporal_ap"] = per_run.mean()
            row["temporal_ap_std"] = per_run.std(ddof=1) if len(per_run) > 1 else 0.0
            row["temporal_ap_blind"] = float(np.mean(list(blind.values())))
        rows.append(row)
    return pd.DataFrame(rows)


def format_markdown(table: pd.DataFrame, title: str, notes: Sequence[str] = (),
                    blind: Mapping[int, float] | None = None) -> str:
    """The table as Markdown: mean ± std over seeds, the paper's number, context-class APs, and with ``blind`` the
    order classes' AP beside the direction-blind bound."""
    class_cols = [c for c in table.columns if c.startswith("ap_")]
    order = "temporal_ap" in table.columns
    val = "val_map_mean" in table.columns
    split = table["split"].iloc[0] if "split" in table.columns and len(table) else "val"
    header = ["variant", f"frame-mAP {split} (ours)", "seeds"] + (["val (selection)"] if val else []) + [
        "paper (AVA v2.2)"] + [
        f"AP {CONTEXT_CLASSES[int(c[3:])].split(' (')[0]} ({c[3:]})" for c in class_cols
    ] + (["AP order classes"] if order else [])
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, r in table.iterrows():
        cells = [r["variant"], f"{r['map_mean']:.2f} ± {r['map_std']:.2f}", str(r["n_seeds"])]
        cells += ([_num(r["val_map_mean"])] if val else []) + [_num(r["paper_map"])]
        cells += [_num(r[c]) for c in class_cols]
        if order:
            cells.append(f"{r['temporal_ap']:.2f} ± {r['temporal_ap_std']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "mAP and AP in percent; ± is the standard deviation over seeds."]
    if order and blind:
        named = ", ".join(f"{CONTEXT_CLASSES.get(c, str(c)).split(' (')[0]} ({c}) {v:.2f}" for c, v in blind.items())
        lines.append(f"Order classes: {', '.join(str(c) for c in blind)}. Direction-blind bound "
                     f"{table['temporal_ap_blind'].iloc[0]:.2f} ({named}): the AP of a head that finds every actor of "
                     "an order pair but guesses the direction; a head above it reads the order.")
    lines += list(notes)
    return "\n".join(lines) + "\n"


def _num(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def plot_table(table: pd.DataFrame, path: Path, title: str, blind: Mapping[int, float] | None = None, *,
               reference: str = "paper_map", reference_label: str = "paper, AVA v2.2",
               left_title: str = "Table 1 variants") -> None:
    """Left: mAP per variant with the seeds' spread, the ``reference`` column (the paper's numbers) as markers.
    Right: AP of the context classes, with ``blind`` the direction-blind bound of each order class as a dashed line
    over its bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    class_cols = [c for c in table.columns if c.startswith("ap_")]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1, 1.6]})
    x = np.arange(len(table))
    ax1.bar(x, table["map_mean"], yerr=table["map_std"], capsize=4, color="#4c72b0", label="ours (mean ± std)")
    ax1.set_xticks(x, table["variant"], rotation=20)
    ax1.set_ylabel("frame-mAP@0.5 (%)")
    ax1.set_title(left_title)
    lo = float(np.nanmin(table["map_mean"] - table["map_std"]))
    ax1.set_ylim(max(0.0, lo - 5.0), None)
    paper = ax1.twinx()
    paper.plot(x, table[reference], "D", color="#dd8452", label=f"{reference_label} (right axis)")
    paper.set_ylabel(f"{reference_label.split(',')[0]} frame-mAP (%)")
    h1, l1 = ax1.get_legend_handles_labels()
    h2, l2 = paper.get_legend_handles_labels()
    ax1.legend(h1 + h2, l1 + l2, loc="lower right", fontsize=8)
    width = 0.8 / max(1, len(table))
    for i, (_, r) in enumerate(table.iterrows()):
        ax2.bar(np.arange(len(class_cols)) + i * width, [r[c] for c in class_cols], width, label=r["variant"])
    bound_label = "direction-blind bound"  # in the legend once
    for j, c in enumerate(class_cols):
        if blind and int(c[3:]) in blind:
            ax2.hlines(blind[int(c[3:])], j - width / 2, j + 0.8 - width / 2, colors="black", linestyles="--",
                       label=bound_label)
            bound_label = None
    ax2.set_xticks(np.arange(len(class_cols)) + 0.4 - width / 2,
                   [CONTEXT_CLASSES[int(c[3:])].split(" (")[0] for c in class_cols], rotation=15)
    ax2.set_ylabel("AP (%)")
    ax2.set_title("classes where context matters")
    ax2.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    try:
        with atomic_file(path) as f:
            fig.savefig(f, format="png", dpi=110)
    finally:
        plt.close(fig)


def write_ablation(results: Sequence[Mapping], out_dir: str | Path, paper: Mapping[str, float],
                   order: Sequence[str], title: str, notes: Sequence[str] = (),
                   blind: Mapping[int, float] | None = None) -> dict[str, Path]:
    """Write table1.md, table1.csv and table1.png into ``out_dir`` (each atomically; a failed write is an
    ``OutputError`` naming the file); returns their paths. ``blind``: see ``ablation_frame``."""
    out_dir = Path(out_dir)
    table = ablation_frame(results, paper, order, blind)
    paths = {"md": out_dir / "table1.md", "csv": out_dir / "table1.csv", "png": out_dir / "table1.png"}
    plot_table(table, paths["png"], title, blind)
    with atomic_file(paths["csv"], "w") as f:
        table.round(4).to_csv(f, index=False)
    write_text(paths["md"], format_markdown(table, title, notes, blind))
    return paths


def publish_ablation(metrics_files: Sequence[Path], out_dir: Path, latest_dirs: Path | Sequence[Path],
                     paper: Mapping[str, float], order: Sequence[str], title: str,
                     labels: Mapping[Path, str] | None = None,
                     blind: Mapping[int, float] | None = None) -> dict[str, Path]:
    """Table 1 of the runs whose ``metrics.json`` are given: written whole into ``out_dir`` (a temporary folder
    renamed into place), then copied over ``table1.*`` of each of ``latest_dirs`` one atomic rename at a time.

    ``labels``: a row name per metrics file (default: the run's variant), e.g. to tell an overridden run from the
    registry's; ``order`` lists row names."""
    results = []
    for p in metrics_files:
        result = json.loads(Path(p).read_text())
        if labels is not None:
            result["variant"] = labels[p]
        results.append(result)
    notes = [f"Runs: {', '.join(sorted({Path(p).parent.parent.name for p in metrics_files}))}"]
    with built_dir(out_dir) as work:  # also removes the temporaries of dead runs
        write_ablation(results, work, paper, order, title, notes, blind)
    return copy_latest(out_dir, latest_dirs, "table1")


def copy_latest(out_dir: Path, latest_dirs: Path | Sequence[Path], stem: str) -> dict[str, Path]:
    """Copy ``<stem>.{md,csv,png}`` of ``out_dir`` over those of each of ``latest_dirs``, one atomic rename at a
    time; returns the first copy of each kind."""
    latest = {}
    for latest_dir in [latest_dirs] if isinstance(latest_dirs, Path) else latest_dirs:
        for kind in ("md", "csv", "png"):
            name = f"{stem}.{kind}"
            with open(out_dir / name, "rb") as src, atomic_file(latest_dir / name) as dst:
                shutil.copyfileobj(src, dst)
            latest.setdefault(kind, latest_dir / name)
    return latest


# ----------------------------------------------------------------------------------------------- the context zoo


def zoo_frame(results: Sequence[Mapping], published: Mapping[str, tuple[float, str]], order: Sequence[str],
              blind: Mapping[int, float] | None = None) -> pd.DataFrame:
    """The context zoo's rows: ``ablation_frame``'s columns without the paper's, plus ``train_s`` (the mean of the
    runs' ``train_time_s``, seconds of head training per run) and the published number beside ours, never mixed
    in: ``published_map`` (AVA val frame-mAP, end to end, percent; v2.2 unless the source names another) and
    ``published_source``."""
    table = ablation_frame(results, {}, order, blind).drop(columns="paper_map")
    train = {name: [r["train_time_s"] for r in results if r["variant"] == name and r.get("train_time_s") is not None]
             for name in table["variant"]}
    at = list(table.columns).index("n_seeds") + 1
    table.insert(at, "train_s", [float(np.mean(train[v])) if train[v] else math.nan for v in table["variant"]])
    table["published_map"] = [published.get(v, (math.nan, ""))[0] for v in table["variant"]]
    table["published_source"] = [published.get(v, (math.nan, ""))[1] for v in table["variant"]]
    return table


def format_zoo_markdown(table: pd.DataFrame, title: str, notes: Sequence[str] = (),
                        blind: Mapping[int, float] | None = None) -> str:
    """The zoo as Markdown: ours (mean ± std, seeds, val, train time, order classes) left, published right."""
    order = "temporal_ap" in table.columns
    val = "val_map_mean" in table.columns
    split = table["split"].iloc[0] if len(table) else "val"
    header = (["head", f"frame-mAP {split} (ours)", "seeds"] + (["val (selection)"] if val else []) +
              ["train s / run"] + (["AP order classes", "blind bound"] if order else []) +
              ["published (AVA val, end to end)", "source"])
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, r in table.iterrows():
        cells = [r["variant"], f"{r['map_mean']:.2f} ± {r['map_std']:.2f}", str(r["n_seeds"])]
        cells += ([_num(r["val_map_mean"])] if val else []) + [f"{r['train_s']:.1f}" if not math.isnan(r["train_s"]) else "–"]
        if order:
            cells += [f"{r['temporal_ap']:.2f} ± {r['temporal_ap_std']:.2f}", _num(r["temporal_ap_blind"])]
        cells += [_num(r["published_map"]), r["published_source"] or "–"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "mAP and AP in percent; ± is the standard deviation over seeds. Ours: heads trained from one feature "
              "cache of one backbone; published: each method's own end-to-end training, frame-mAP on AVA v2.2 val "
              "unless its source says otherwise, for reference only (another dataset, backbone and schedule)."]
    if order and blind:
        lines.append(f"Order classes: {', '.join(str(c) for c in blind)}; the blind bound is the AP of a head that "
                     "finds every actor of an order pair but guesses the direction.")
    lines += list(notes)
    return "\n".join(lines) + "\n"


def publish_zoo(results: Sequence[Mapping], out_dir: Path, latest_dirs: Path | Sequence[Path],
                published: Mapping[str, tuple[float, str]], order: Sequence[str], title: str,
                blind: Mapping[int, float] | None = None, notes: Sequence[str] = ()) -> dict[str, Path]:
    """``table.{md,csv,png}`` of the zoo's runs (metrics dicts as ``ablation_frame`` takes them, with
    ``train_time_s``), written whole into ``out_dir``, then copied over those of ``latest_dirs``."""
    table = zoo_frame(results, published, order, blind)
    with built_dir(out_dir) as work:
        plot_table(table, work / "table.png", title, blind, reference="published_map",
                   reference_label="published, AVA", left_title="context heads on one cache")
        with atomic_file(work / "table.csv", "w") as f:
            table.round(4).to_csv(f, index=False)
        write_text(work / "table.md", format_zoo_markdown(table, title, notes, blind))
    return copy_latest(out_dir, latest_dirs, "table")
