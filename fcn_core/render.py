"""PNG pictures of wafers, confusion matrices and training curves (matplotlib, Agg backend).

Colours: die maps show no-die white, pass light grey, fail dark; label and prediction maps use
each class's ``ClassSpec.color`` with off-wafer dies white. Figures are drawn on an explicit Agg
canvas, not through pyplot: headless, thread-safe (Prefect may render from worker threads), no
global backend switch and nothing done at import time.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from fcn_core.config import ClassSpec
from fcn_core.table import FAIL, NO_DIE, PASS, die_maps as table_die_maps, label_maps as table_label_maps

DIE_COLORS = {NO_DIE: "#ffffff", PASS: "#d0d0d0", FAIL: "#262626"}
DIE_NAMES = {NO_DIE: "no die", PASS: "pass", FAIL: "fail"}
OFF_WAFER = "#ffffff"
PANEL_INCHES = 2.4
LEGEND_ITEM_INCHES = 1.2
DPI = 100

MapList = Sequence[np.ndarray | None]


def render_wafers(
    die_maps: Sequence[np.ndarray] | pa.Table,
    path: str | os.PathLike,
    *,
    classes: Sequence[ClassSpec],
    label_maps: MapList | None = None,
    predictions: MapList | None = None,
    titles: Sequence[str] | None = None,
    ncols: int | None = None,
) -> Path:
    """Write a PNG grid, one wafer per row: die map | truth | prediction (only the given ones).

    ``die_maps`` is a list of (h, w) maps or a wafer table (its label maps and wafer ids are then
    used unless ``label_maps`` / ``titles`` are given). ``ncols`` puts that many wafers side by
    side (default 1). A wafer whose label or prediction is None gets an empty panel.
    """
    if isinstance(die_maps, pa.Table):
        table = die_maps
        die_maps = table_die_maps(table)
        has_labels = "label_map" in table.column_names and table.column("label_map").null_count < table.num_rows
        if label_maps is None and has_labels:
            label_maps = table_label_maps(table)
        if titles is None:
            titles = _table_titles(table)
    dies = [np.asarray(d) for d in die_maps]
    n = len(dies)
    if n == 0:
        raise ValueError("render_wafers: no wafers to draw")
    layers = [("die map", None)]
    for name, maps in (("truth", label_maps), ("prediction", predictions)):
        if maps is not None:
            if len(maps) != n:
                raise ValueError(f"render_wafers: {len(maps)} {name} maps for {n} die maps")
            layers.append((name, list(maps)))
    if titles is not None and len(titles) != n:
        raise ValueError(f"render_wafers: {len(titles)} titles for {n} wafers")
    ncols = ncols or 1
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")

    die_lut = _lut(DIE_COLORS)
    class_lut = _lut({c.id: c.color for c in classes})
    handles = _legend_handles({DIE_NAMES[k]: v for k, v in DIE_COLORS.items()})
    if len(layers) > 1:
        handles += _legend_handles({c.name: c.color for c in classes})
    n_rows, per_row = math.ceil(n / ncols), ncols * len(layers)
    width = PANEL_INCHES * per_row
    legend_cols = max(1, min(len(handles), int(width / LEGEND_ITEM_INCHES)))
    legend_height = 0.3 * math.ceil(len(handles) / legend_cols) + 0.15
    fig = _figure(width, PANEL_INCHES * n_rows + legend_height)
    axes = fig.subplots(n_rows, per_row, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for i, die in enumerate(dies):
        if die.ndim != 2:
            raise ValueError(f"render_wafers: die map {i} has shape {die.shape}, expected (h, w)")
        row, first = divmod(i, ncols)
        for j, (name, maps) in enumerate(layers):
            ax = axes[row, first * len(layers) + j]
            if titles is None or j:
                ax.set_title(name, fontsize=8)
            else:  # the wafer's title starts at its first panel and runs on over the others
                ax.set_title(f"{titles[i]}\n{name}", fontsize=8, loc="left")
            if maps is None:
                image = die_lut[die]
            elif maps[i] is None:
                ax.text(0.5, 0.5, f"no {name}", ha="center", va="center", fontsize=8, color="#888888")
                continue
            else:
                image = _colour_classes(np.asarray(maps[i]), die, class_lut, len(classes), name, i)
            ax.imshow(image, interpolation="nearest")
    fig.legend(handles=handles, loc="lower center", ncol=legend_cols, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, legend_height / fig.get_figheight(), 1, 1))
    return _save(fig, path)


def render_confusion(hist: np.ndarray, path: str | os.PathLike, *, class_names: Sequence[str]) -> Path:
    """Confusion matrix ``hist[truth, prediction]``: colours normalised per truth row, counts annotated."""
    hist = np.asarray(hist, dtype=np.float64)
    k = len(class_names)
    if hist.shape != (k, k):
        raise ValueError(f"render_confusion: hist has shape {hist.shape}, expected ({k}, {k})")
    totals = hist.sum(axis=1, keepdims=True)
    share = np.divide(hist, totals, out=np.zeros_like(hist), where=totals > 0)
    side = 1.2 + 0.9 * k
    fig = _figure(side + 1.2, side)
    ax = fig.subplots()
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    ax.set_xticks(range(k), class_names, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(k), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for t in range(k):
        for p in range(k):
            ax.text(p, t, f"{int(hist[t, p]):,}\n{share[t, p]:.0%}", ha="center", va="center",
                    fontsize=7, color="white" if share[t, p] > 0.5 else "black")
    fig.tight_layout()
    return _save(fig, path)


def render_curves(history: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Train loss and val mean IU per epoch, one line per stage.

    ``history`` entries carry ``stage`` and any of ``train_loss`` / ``val_mean_iu``, in training
    order; the x axis counts epochs across stages so FCN-32s -> 16s -> 8s read left to right.
    """
    if not history:
        raise ValueError("render_curves: empty history")
    fig = _figure(10, 3.6)
    ax_loss, ax_iu = fig.subplots(1, 2)
    stages: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for x, entry in enumerate(history, start=1):
        stages.setdefault(str(entry.get("stage", "train")), []).append((x, entry))
    for stage, points in stages.items():
        for ax, key in ((ax_loss, "train_loss"), (ax_iu, "val_mean_iu")):
            xy = [(x, e[key]) for x, e in points if e.get(key) is not None]
            if xy:
                ax.plot(*zip(*xy), marker="o", markersize=3, label=stage)
    for ax, name in ((ax_loss, "train loss"), (ax_iu, "val mean IU")):
        ax.set_xlabel("epoch (all stages)")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


# -- helpers -------------------------------------------------------------------------------------
def _figure(width: float, height: float):
    """A Figure bound to the Agg canvas (no pyplot state, so no figure to close)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _rgb(colour: str) -> np.ndarray:
    from matplotlib.colors import to_rgb

    return np.round(np.array(to_rgb(colour)) * 255).astype(np.uint8)


def _lut(colours: dict[int, str]) -> np.ndarray:
    """(256, 3) uint8 colour lookup table; values without a colour show as magenta (never valid)."""
    lut = np.tile(_rgb("#ff00ff"), (256, 1))
    for value, colour in colours.items():
        lut[value] = _rgb(colour)
    return lut


def _colour_classes(classes_map: np.ndarray, die: np.ndarray, lut: np.ndarray, n_classes: int,
                    name: str, index: int) -> np.ndarray:
    if classes_map.shape != die.shape:
        raise ValueError(f"render_wafers: {name} map {index} has shape {classes_map.shape}, "
                         f"die map {die.shape}")
    if classes_map.size and int(classes_map.max()) >= n_classes:
        raise ValueError(f"render_wafers: {name} map {index} holds class {int(classes_map.max())}, "
                         f"only {n_classes} classes are configured")
    image = lut[classes_map.astype(np.uint8)]
    image[die == NO_DIE] = _rgb(OFF_WAFER)
    return image


def _legend_handles(colours: dict[str, str]) -> list:
    from matplotlib.patches import Patch

    return [Patch(facecolor=c, edgecolor="#555555", linewidth=0.5, label=name) for name, c in colours.items()]


def _table_titles(table: pa.Table) -> list[str]:
    ids = table.column("wafer_id").to_pylist()
    labels = table.column("wafer_label").to_pylist() if "wafer_label" in table.column_names else [None] * len(ids)
    return [f"{i} ({lab})" if lab else str(i) for i, lab in zip(ids, labels)]


def _save(fig, path: str | os.PathLike) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=DPI)
    return out
