"""One honest split of the real labelled maps: what trains, what calibrates, what is scored.

The real-data folder (``fcn_core.settings``) holds two kinds of tables:

- ``TRAINING_TABLES`` (``wm811k-train``, ``mixedwm38-train``): the only real maps a model may be
  trained on (weak labels, pseudo-masks, ...).
- ``HELD_OUT_TABLES`` (``wm811k-val``, ``mixedwm38-val``): never trained on. Each is cut once, by a
  fixed hash, into a **calibration** part (verdict thresholds are fitted there) and a **scoring**
  part (the reported figures come from there only).

The cut hashes the map itself, not its row or id: ``u = blake2b(SPLIT_SALT, height, width,
die_map)`` read as a number in [0, 1), calibration when ``u < CALIBRATION_FRACTION``. So the split
is the same in every run, on every machine, whatever order or ids the table comes in, and the few
identical maps a data set holds always land on the same side (no map is both calibrated and
scored on). Changing the salt or the fraction reshuffles every map and makes old figures
incomparable: don't.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

TRAINING_TABLES = ("wm811k-train.parquet", "mixedwm38-train.parquet")
HELD_OUT_TABLES = ("wm811k-val.parquet", "mixedwm38-val.parquet")
SPLIT_SALT = "wafer-fcn-real-split-v1"
CALIBRATION_FRACTION = 0.5


@dataclass(frozen=True)
class HeldOutSplit:
    """The two disjoint parts of one held-out table, rows in their original order."""

    calibration: pa.Table
    scoring: pa.Table


def map_unit_hashes(table: pa.Table, *, salt: str = SPLIT_SALT) -> np.ndarray:
    """(N,) float64 in [0, 1): a salted blake2b hash of each row's (height, width, die_map)."""
    missing = [c for c in ("height", "width", "die_map") if c not in table.column_names]
    if missing:
        raise ValueError(f"the real split hashes the maps, but the table has no {', '.join(missing)} column")
    prefix = salt.encode() + b"\x1f"
    heights = table.column("height").to_pylist()
    widths = table.column("width").to_pylist()
    out = np.empty(table.num_rows, np.float64)
    for i, (h, w, die) in enumerate(zip(heights, widths, table.column("die_map").to_pylist())):
        if die is None:
            raise ValueError(f"row {i}: die_map is null; validate the table before splitting it")
        digest = hashlib.blake2b(prefix + f"{h}x{w}\x1f".encode() + die, digest_size=8).digest()
        out[i] = int.from_bytes(digest, "big") / 2.0**64
    return out


def calibration_mask(table: pa.Table, *, fraction: float = CALIBRATION_FRACTION,
                     salt: str = SPLIT_SALT) -> np.ndarray:
    """Boolean per row: True = calibration part, False = scoring part (about ``fraction`` calibrates)."""
    if not 0 < fraction < 1:
        raise ValueError(f"calibration fraction must lie strictly between 0 and 1, got {fraction}")
    return map_unit_hashes(table, salt=salt) < fraction


def split_held_out(table: pa.Table, *, fraction: float = CALIBRATION_FRACTION,
                   salt: str = SPLIT_SALT) -> HeldOutSplit:
    """A held-out table cut into its calibration and scoring parts (:func:`calibration_mask`)."""
    mask = calibration_mask(table, fraction=fraction, salt=salt)
    return HeldOutSplit(calibration=table.filter(pa.array(mask)), scoring=table.filter(pa.array(~mask)))


def check_trainable(path: str | os.PathLike) -> Path:
    """``path`` if a model may train on it; a held-out table (by file name) is refused with one line."""
    path = Path(path)
    if path.name in HELD_OUT_TABLES:
        raise ValueError(f"{path} is a held-out table ({', '.join(HELD_OUT_TABLES)} are never trained on: "
                         f"they calibrate and score); train on {' or '.join(TRAINING_TABLES)}")
    return path
