"""The predictions table: what the nightly flow and ``wafer-fcn predict`` write, one row per wafer.

Columns: wafer_id, lot_id, captured_at, height, width, pred_map, ``dies_<class>`` per pattern
class (:func:`fcn_core.verdicts.dies_column`), fail_dies, yield, dominant_pattern,
dominant_share, patterns (the multi-label verdict: 'ring+scratch' or 'none'), model_name, model_version, then any ``extra`` string columns (run ids).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from fcn_core.inference.packed import PackedMaps
from fcn_core.table import PASS
from fcn_core.verdicts import WaferVerdicts, dies_column

PASSTHROUGH_COLUMNS = ("wafer_id", "lot_id", "captured_at", "height", "width")


def pass_dies(maps: PackedMaps) -> np.ndarray:
    """(N,) pass dies per map: one bincount over the positions of the pass dies."""
    where = np.flatnonzero(maps.data == PASS)
    owner = np.searchsorted(maps.starts + maps.sizes, where, side="right")
    return np.bincount(owner, minlength=len(maps))


def predictions_table(
    table: pa.Table,
    maps: PackedMaps,
    labels: np.ndarray,
    verdicts: WaferVerdicts,
    *,
    class_names: Sequence[str],
    model_name: str,
    model_version: str,
    extra: dict[str, str] | None = None,
) -> pa.Table:
    """The predictions table of ``table``'s wafers from their flat ``labels`` (``maps``' layout).

    ``pred_map`` shares the input's row offsets: it is built from the flat label buffer without
    a Python object per wafer. ``verdicts`` are those of ``labels`` (after any shape rules).
    """
    n = len(maps)
    n_pass = pass_dies(maps)
    on_wafer = verdicts.fail_dies + n_pass
    offsets = np.append(maps.starts, maps.data.size).astype(np.int32)
    columns: dict[str, pa.Array] = {name: table.column(name) for name in PASSTHROUGH_COLUMNS}
    columns["pred_map"] = pa.BinaryArray.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets),
                                                                       pa.py_buffer(labels)])
    for cid, name in enumerate(class_names):
        if cid == 0:
            continue  # background dies = fail dies minus the pattern dies; not worth a column
        columns[dies_column(name)] = pa.array(verdicts.dies[:, cid], pa.int32())
    columns["fail_dies"] = pa.array(verdicts.fail_dies, pa.int32())
    columns["yield"] = pa.array(np.divide(n_pass, on_wafer, out=np.zeros(n), where=on_wafer > 0), pa.float64())
    columns["dominant_pattern"] = pa.array(verdicts.dominant_pattern, pa.string())
    columns["dominant_share"] = pa.array(verdicts.dominant_share, pa.float64())
    columns["patterns"] = pa.array(verdicts.patterns, pa.string())
    columns["model_name"] = pa.array([model_name] * n, pa.string())
    columns["model_version"] = pa.array([str(model_version)] * n, pa.string())
    for key, value in (extra or {}).items():
        columns[key] = pa.array([value] * n, pa.string())
    return pa.table(columns)
