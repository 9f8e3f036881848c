"""Inference: die maps in, per-die pattern labels out (the code the nightly flow runs).

Pass dies are background by definition and no-die positions carry no label, so predictions are
forced to background everywhere except on fail dies.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from fcn_core.config import Config
from fcn_core.data import WaferSet
from fcn_core.padding import Batch, crop_map
from fcn_core.table import FAIL, PASS
from fcn_core.verdicts import wafer_verdicts

DEFAULT_BATCH = 256


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_for(device: torch.device, *, bf16: bool | None = None):
    """bf16 autocast on CUDA by default; on CPU only when asked (it pays off with AMX only)."""
    use = (device.type == "cuda") if bf16 is None else bf16
    if not use:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def batch_labels(model: nn.Module, batch: Batch, device: torch.device, *, bf16: bool | None = None) -> torch.Tensor:
    """(N, H, W) int64 labels on ``device`` for a padded batch, background off fail dies."""
    x = batch.x.to(device, non_blocking=True)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast_for(device, bf16=bf16):
        logits = model(x)
    labels = logits.argmax(1)
    die = torch.as_tensor(batch.die).to(device, non_blocking=True)
    return labels.masked_fill_(die != FAIL, 0)


@torch.inference_mode()
def predict_maps(
    model: nn.Module,
    die_maps: Sequence[np.ndarray],
    *,
    batch_size: int = DEFAULT_BATCH,
    device: str | torch.device = "cpu",
    multiple: int = 32,
    fixed: int | None = None,
    bf16: bool | None = None,
) -> list[np.ndarray]:
    """uint8 label maps (label_map layout) for each die map, in input order."""
    device = resolve_device(device) if isinstance(device, str) else device
    model.eval()
    wafers = WaferSet(wafer_ids=[""] * len(die_maps), die=list(die_maps))
    out: list[np.ndarray | None] = [None] * len(die_maps)
    for idx, batch in wafers.batches(batch_size=batch_size, multiple=multiple, fixed=fixed, with_targets=False):
        labels = batch_labels(model, batch, device, bf16=bf16).to("cpu", torch.uint8).numpy()
        for row, i in enumerate(idx):
            h, w = batch.sizes[row]
            out[i] = np.ascontiguousarray(crop_map(labels[row], h, w))
    return out  # type: ignore[return-value]


def column_name(class_name: str) -> str:
    """'local zone' -> 'dies_local_zone'."""
    return "dies_" + re.sub(r"\W+", "_", class_name.strip().lower())


def score_table(
    model: nn.Module,
    table: pa.Table,
    *,
    cfg: Config,
    model_name: str,
    model_version: str,
    batch_size: int = DEFAULT_BATCH,
    device: str | torch.device = "cpu",
    extra: dict[str, str] | None = None,
) -> pa.Table:
    """The predictions table: one row per (valid) input wafer.

    Columns: wafer_id, lot_id, captured_at, height, width, pred_map, dies_<class> per class,
    fail_dies, yield, dominant_pattern, dominant_share, model_name, model_version (+ ``extra``
    string columns such as run ids).
    """
    wafers = WaferSet.from_table(table)
    preds = predict_maps(model, wafers.die, batch_size=batch_size, device=device,
                         multiple=cfg.data.pad_multiple, fixed=cfg.data.pad_fixed)
    verdicts = wafer_verdicts(preds, wafers.die, class_names=cfg.class_names, verdict=cfg.verdict)
    n = len(preds)
    n_pass = np.fromiter(((d == PASS).sum() for d in wafers.die), np.int64, count=n)
    on_wafer = verdicts.fail_dies + n_pass
    columns: dict[str, pa.Array] = {
        "wafer_id": table.column("wafer_id"),
        "lot_id": table.column("lot_id"),
        "captured_at": table.column("captured_at"),
        "height": table.column("height"),
        "width": table.column("width"),
        "pred_map": pa.array([p.tobytes() for p in preds], pa.binary()),
    }
    for cid, name in enumerate(cfg.class_names):
        if cid == 0:
            continue  # background dies = fail dies minus the pattern dies; not worth a column
        columns[column_name(name)] = pa.array(verdicts.dies[:, cid], pa.int32())
    columns["fail_dies"] = pa.array(verdicts.fail_dies, pa.int32())
    columns["yield"] = pa.array(np.divide(n_pass, on_wafer, out=np.zeros(n), where=on_wafer > 0), pa.float64())
    columns["dominant_pattern"] = pa.array(verdicts.dominant_pattern, pa.string())
    columns["dominant_share"] = pa.array(verdicts.dominant_share, pa.float64())
    columns["model_name"] = pa.array([model_name] * n, pa.string())
    columns["model_version"] = pa.array([str(model_version)] * n, pa.string())
    for key, value in (extra or {}).items():
        columns[key] = pa.array([value] * n, pa.string())
    return pa.table(columns)
