"""MixedWM38 ``Wafer_Map_Datasets.npz``: 38,015 52x52 maps with 8 multi-hot pattern labels.

Copies of this file in circulation encode the die states differently. The encoding is chosen once
per file from the set of values present, by these explicit rules (``ENCODINGS``, first match wins):

- values within {0, 1, 2}: the original layout, 0 no die, 1 pass, 2 fail;
- values within {0, 1, 3}: 3 is fail (a copy that shifted fail to 3);
- values within {0, 127, 255} or {0, 128, 255}: grey-level images, 127/128 pass, 255 fail.

Encodings that share a value agree on its meaning (0 always no die, 1 always pass, 255 always
fail), so a file whose values fit several encodings decodes the same way under each. Any other
value set (e.g. {0, 1, 2, 3}, negatives, fractions) is rejected.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from ..table import FAIL, NO_DIE, PASS, make_table
from ._common import PathLike, ReaderError, existing_file

# Column order of arr_1, as published with the data set.
MIXEDWM38_LABELS = ("Center", "Donut", "Edge-Loc", "Edge-Ring", "Loc", "Near-full", "Scratch", "Random")

ENCODINGS: dict[str, dict[int, int]] = {
    "0/1/2": {0: NO_DIE, 1: PASS, 2: FAIL},
    "0/1/3": {0: NO_DIE, 1: PASS, 3: FAIL},
    "0/127/255": {0: NO_DIE, 127: PASS, 255: FAIL},
    "0/128/255": {0: NO_DIE, 128: PASS, 255: FAIL},
}


def _values_present(maps: np.ndarray) -> set[int]:
    """The distinct die values of the whole array, checked to be whole numbers in 0..255."""
    if maps.dtype.kind not in "uif":
        raise ReaderError(f"arr_0 has dtype {maps.dtype}, expected numbers")
    lo, hi = maps.min(), maps.max()
    if lo < 0 or hi > 255:
        raise ReaderError(f"arr_0 values span [{lo}, {hi}]; known encodings: {', '.join(ENCODINGS)}")
    if maps.dtype.kind == "f" and not np.array_equal(maps, np.round(maps)):
        raise ReaderError("arr_0 holds fractional values; known encodings: " + ", ".join(ENCODINGS))
    counts = np.bincount(maps.astype(np.uint8, copy=False).ravel(), minlength=256)
    return {int(v) for v in np.flatnonzero(counts)}


def choose_encoding(values: set[int]) -> str:
    """Name of the first encoding in ``ENCODINGS`` whose values include all of ``values``."""
    for name, table in ENCODINGS.items():
        if values <= table.keys():
            return name
    raise ReaderError(f"die values {sorted(values)} match no known encoding ({', '.join(ENCODINGS)}); "
                      "refusing to guess which value means pass and which fail")


def decode_maps(maps: np.ndarray) -> tuple[np.ndarray, str]:
    """(N, H, W) raw maps -> (uint8 maps in 0/1/2, encoding name)."""
    name = choose_encoding(_values_present(maps))
    lut = np.zeros(256, dtype=np.uint8)
    for raw, state in ENCODINGS[name].items():
        lut[raw] = state
    return lut[maps.astype(np.uint8, copy=False)], name


def label_names(multi_hot: np.ndarray) -> list[str]:
    """(N, 8) 0/1 rows -> 'Center+Scratch' style names, 'none' when no pattern is set."""
    names = np.array(MIXEDWM38_LABELS, dtype=object)
    return ["+".join(names[row.astype(bool)]) or "none" for row in multi_hot]


def read_mixedwm38(path: PathLike, *, id_prefix: str | None = None) -> pa.Table:
    """Read the MixedWM38 npz into a wafer table.

    wafer_id is ``"<id_prefix>.<row>"`` (prefix defaults to the file stem), no lot, no label maps;
    wafer_label is the pattern names present joined with '+', or 'none'.
    """
    p = existing_file(path)
    try:
        with np.load(p, allow_pickle=False) as npz:  # no pickle: an npz must not run code
            keys = set(npz.files)
            if not {"arr_0", "arr_1"} <= keys:
                raise ReaderError(f"{p}: expected arrays arr_0 (maps) and arr_1 (labels), found {sorted(keys)}")
            maps, labels = npz["arr_0"], npz["arr_1"]
    except ReaderError:
        raise
    except Exception as exc:  # zipfile / numpy format errors, object arrays needing pickle
        raise ReaderError(f"{p}: not a readable numpy .npz file ({type(exc).__name__}: {exc})") from exc

    if maps.ndim != 3 or 0 in maps.shape:
        raise ReaderError(f"{p}: arr_0 has shape {maps.shape}, expected (N, H, W) maps")
    n = maps.shape[0]
    if labels.shape != (n, len(MIXEDWM38_LABELS)):
        raise ReaderError(f"{p}: arr_1 has shape {labels.shape}, expected ({n}, {len(MIXEDWM38_LABELS)}) "
                          f"multi-hot labels in the order {', '.join(MIXEDWM38_LABELS)}")
    if labels.dtype.kind not in "uifb" or not np.isin(labels, (0, 1)).all():
        raise ReaderError(f"{p}: arr_1 must hold only 0 and 1")
    try:
        decoded, _ = decode_maps(maps)
    except ReaderError as exc:
        raise ReaderError(f"{p}: {exc}") from None

    prefix = id_prefix if id_prefix is not None else Path(p).stem
    width = len(str(max(n - 1, 0)))
    return make_table(
        wafer_ids=[f"{prefix}.{i:0{width}d}" for i in range(n)],
        die_maps=list(decoded),
        wafer_labels=label_names(labels),
    )
