"""WM-811K ``LSWMD.pkl``: the original pandas pickle of 811,457 wafer maps.

Columns used: ``waferMap`` (2-D arrays of 0 no die / 1 pass / 2 fail), ``lotName``, ``waferIndex``
and ``failureType`` (nested arrays like ``[['Edge-Ring']]``, empty when unlabelled). ``dieSize``
and ``trianTestLabel`` are ignored: the pipeline makes its own lot-hashed splits.
"""

from __future__ import annotations

import math
import pickle
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from ..table import make_table
from ._common import PathLike, ReaderError, UntrustedFileError, existing_file

REQUIRED_COLUMNS = ("waferMap", "lotName", "waferIndex", "failureType")

# The published file was written by a 2015 pandas whose index classes lived in ``pandas.indexes``.
_MODULE_RENAMES = {"pandas.indexes": "pandas.core.indexes"}
try:  # pandas' own table of moved classes (private, so optional)
    from pandas.compat.pickle_compat import _class_locations_map as _PANDAS_MOVED
except ImportError:  # pragma: no cover - depends on the pandas version
    _PANDAS_MOVED = {}


class _LegacyPandasUnpickler(pickle.Unpickler):
    """The C unpickler, with old pandas module paths redirected to where the classes live now."""

    def find_class(self, module: str, name: str) -> Any:
        for old, new in _MODULE_RENAMES.items():
            if module == old or module.startswith(old + "."):
                module = new + module[len(old):]
        module, name = _PANDAS_MOVED.get((module, name), (module, name))
        return super().find_class(module, name)


def _load_frame(path: PathLike) -> pd.DataFrame:
    with open(path, "rb") as fh:
        # latin1: the only encoding that round-trips Python 2 numpy array pickles (numpy's advice)
        obj = _LegacyPandasUnpickler(fh, encoding="latin1").load()
    if not isinstance(obj, pd.DataFrame):
        raise ReaderError(f"{path}: the pickle holds a {type(obj).__name__}, not a pandas DataFrame")
    return obj


def _label(value: Any, row: int) -> str | None:
    """``[['Edge-Ring']]`` -> 'Edge-Ring'; ``[]``, None, NaN or '' -> None (unlabelled)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        return value.strip() or None
    flat = np.asarray(value, dtype=object).ravel()
    if flat.size == 0:
        return None
    if flat.size > 1:
        raise ReaderError(f"row {row}: failureType holds {flat.size} values, expected one")
    return _label(flat[0], row)


def _die_map(value: Any, row: int) -> np.ndarray:
    m = np.asarray(value)
    if m.ndim != 2 or m.size == 0:
        raise ReaderError(f"row {row}: waferMap has shape {m.shape}, expected a non-empty 2-D array")
    if m.dtype.kind not in "uif":
        raise ReaderError(f"row {row}: waferMap has dtype {m.dtype}, expected numbers 0/1/2")
    lo, hi = m.min(), m.max()
    if lo < 0 or hi > 2 or (m.dtype.kind == "f" and not np.array_equal(m, np.round(m))):
        raise ReaderError(f"row {row}: waferMap values must be 0 (no die), 1 (pass) or 2 (fail); "
                          f"found values in [{lo}, {hi}]")
    return m.astype(np.uint8, copy=False)


def read_wm811k_pickle(path: PathLike, *, trust: bool = False) -> pa.Table:
    """Read ``LSWMD.pkl`` into a wafer table (no label maps; wafer_label = failure type or null).

    Loading a pickle executes code chosen by whoever wrote the file, so this refuses unless
    ``trust=True`` says the file comes from a source you trust.
    wafer_id is ``"<lotName>.w<waferIndex>"``, lot_id the lot name.
    """
    p = existing_file(path)
    if not trust:
        raise UntrustedFileError(
            f"{p} is a Python pickle: loading it runs code stored in the file. Pass trust=True "
            "(CLI: --trust) only for a file from a source you trust, such as LSWMD.pkl as published "
            "by MIR lab."
        )
    try:
        df = _load_frame(p)
    except ReaderError:
        raise
    except Exception as exc:  # unpickling raises many types for truncated or foreign files
        raise ReaderError(f"{p}: not a readable pandas pickle ({type(exc).__name__}: {exc})") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ReaderError(f"{p}: missing column(s) {missing}; found {list(df.columns)}")

    lots = df["lotName"].to_numpy(dtype=object)
    indexes = pd.to_numeric(df["waferIndex"], errors="coerce").to_numpy(dtype=float)
    bad = np.flatnonzero(~np.isfinite(indexes) | (indexes != np.round(indexes)))
    if bad.size:
        raise ReaderError(f"{p}: row {int(bad[0])}: waferIndex {df['waferIndex'].iloc[bad[0]]!r} "
                          "is not a whole number")
    no_lot = [i for i, lot in enumerate(lots) if not isinstance(lot, str) or not lot]
    if no_lot:
        raise ReaderError(f"{p}: row {no_lot[0]}: lotName {lots[no_lot[0]]!r} is not a name")

    try:
        maps = [_die_map(v, i) for i, v in enumerate(df["waferMap"])]
        labels = [_label(v, i) for i, v in enumerate(df["failureType"])]
    except ReaderError as exc:
        raise ReaderError(f"{p}: {exc}") from None
    ids = [f"{lot}.w{int(ix)}" for lot, ix in zip(lots, indexes)]
    return make_table(wafer_ids=ids, die_maps=maps, lot_ids=list(lots), wafer_labels=labels)
