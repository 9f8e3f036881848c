"""The render-night task of the demo flow: a picture of a scored night, and its patterns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from fcn_core.config import Config
from fcn_core.table import read_parquet

PICTURE_WAFERS = 8


class NightPicture(BaseModel):
    """Where the night's picture is, and how many of its wafers each dominant pattern has."""

    path: str
    wafers: int  # wafers drawn
    patterns: dict[str, int]  # dominant pattern -> wafers, over the whole night, most first


@task(name="render-night", cache_policy=NO_CACHE)
def render_night(*, cfg: Config, drop: str, predictions: str, out: str) -> NightPicture:
    """Die map | truth | prediction of the night's first wafers, and the night's wafers per dominant pattern."""
    from fcn_core.render import render_wafers  # lazy: matplotlib

    preds = read_parquet(predictions)
    chosen = read_parquet(drop).slice(0, PICTURE_WAFERS)
    blobs = dict(zip(preds.column("wafer_id").to_pylist(), preds.column("pred_map").to_pylist()))
    maps = [None if (blob := blobs.get(w)) is None else np.frombuffer(blob, np.uint8).reshape(h, wd)
            for w, h, wd in zip(*(chosen.column(c).to_pylist() for c in ("wafer_id", "height", "width")))]
    path = render_wafers(chosen, Path(out), classes=cfg.classes, predictions=maps, ncols=2)
    counts = sorted(preds.column("dominant_pattern").value_counts().to_pylist(), key=lambda r: -r["counts"])
    get_run_logger().info("picture of %d wafers of tonight: %s", chosen.num_rows, path)
    return NightPicture(path=str(path), wafers=chosen.num_rows,
                        patterns={str(r["values"]): int(r["counts"]) for r in counts})


@task(name="render-most-affected", cache_policy=NO_CACHE)
def render_most_affected(*, cfg: Config, night: str, curated_root: str, predictions: str, out: str) -> str:
    """Die map | prediction of the night's wafers with the highest share of dies in a pattern (8 at most),
    titled by wafer, dominant pattern and that share; returns the PNG's path."""
    from fcn_core.nightly_report import most_affected
    from fcn_core.render import render_wafers  # lazy: matplotlib
    from fcn_core.table import NO_DIE
    from fcn_core.verdicts import dies_column
    from tasks.scoring import part_files, partition_dir

    preds = read_parquet(predictions)
    pattern_dies = np.sum([preds.column(dies_column(name)).to_numpy() for name in cfg.class_names[1:]], axis=0)
    shapes = list(zip(preds.column("height").to_pylist(), preds.column("width").to_pylist(), strict=True))
    # on-wafer dies from the night's die maps (the predictions keep only the predicted map)
    dies_by_id = {}
    folder = partition_dir(curated_root, night)
    for part in part_files(curated_root, night):
        table = read_parquet(f"{folder}/{part}").select(["wafer_id", "die_map", "height", "width"])
        for w, blob, h, wd in zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True):
            dies_by_id[w] = np.frombuffer(blob, np.uint8).reshape(h, wd)
    ids = preds.column("wafer_id").to_pylist()
    missing = [w for w in ids if w not in dies_by_id]
    if missing:
        raise FileNotFoundError(f"night {night}: {len(missing)} predicted wafers (e.g. {missing[0]}) have no die map "
                                f"under {folder}")
    on_wafer = np.array([int((dies_by_id[w] != NO_DIE).sum()) for w in ids])
    pick = most_affected(pattern_dies, on_wafer, n=PICTURE_WAFERS)
    blobs = preds.column("pred_map").to_pylist()
    dominant = preds.column("dominant_pattern").to_pylist()
    maps = [np.frombuffer(blobs[i], np.uint8).reshape(shapes[i]) for i in pick]
    titles = [f"{ids[i]}: {dominant[i]}, {100 * pattern_dies[i] / max(1, on_wafer[i]):.0f}% pattern dies" for i in pick]
    path = render_wafers([dies_by_id[ids[i]] for i in pick], Path(out), classes=cfg.classes, predictions=maps,
                         titles=titles, ncols=2)
    get_run_logger().info("night %s: picture of its %d most affected wafers: %s", night, len(pick), path)
    return str(path)
