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
