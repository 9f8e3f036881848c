"""Maps as one flat buffer, size-bucketed batches and the forward passes over them.

Built for throughput on small CPUs (docs/performance.md):

- maps travel as one flat uint8 buffer with row offsets (:class:`PackedMaps`), the layout of the
  Parquet ``die_map`` column itself, so a table is decoded and the ``pred_map`` column is built
  without one Python object per wafer;
- batches hold maps of one padded shape (size buckets) and at most ``max_batch_pixels`` padded
  dies, which keeps activations cache-sized for small maps and memory bounded for large ones;
- the network runs as :func:`fcn_core.inference.fastpath.fast_module` makes it, with bf16
  autocast where the hardware computes bf16 natively.

Pass dies are background by definition and no-die positions carry no label, so predictions are
forced to background everywhere except on fail dies.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from fcn_core.inference.fastpath import fast_module, one_hot_channels_last
from fcn_core.inference.runtime import (autocast_for, class_ids, inference_bf16, intra_op_threads, resolve_device,
                                       tta_scores)
from fcn_core.padding import N_DIE_STATES, padded_shape, size_buckets
from fcn_core.table import FAIL

DEFAULT_BATCH = 256
# Padded dies per forward pass (256 maps of 32 x 32, 64 of 64 x 64): cache-sized activations for
# small maps, bounded memory for big ones (docs/performance.md).
DEFAULT_BATCH_PIXELS = 256 * 32 * 32


@dataclass(frozen=True)
class PackedMaps:
    """N row-major uint8 maps in one flat buffer: map i is ``data[starts[i]:starts[i] + h*w]``."""

    data: np.ndarray  # (total,) uint8
    starts: np.ndarray  # (N,) int64
    heights: np.ndarray  # (N,) int64
    widths: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def sizes(self) -> np.ndarray:
        """(N,) dies per map."""
        return self.heights * self.widths

    def unpack(self, data: np.ndarray | None = None) -> list[np.ndarray]:
        """(h, w) views of ``data`` (default: this buffer) laid out like these maps."""
        buf = self.data if data is None else data
        return [buf[s:s + h * w].reshape(h, w)
                for s, h, w in zip(self.starts.tolist(), self.heights.tolist(), self.widths.tolist())]


def pack_maps(maps: Sequence[np.ndarray]) -> PackedMaps:
    """Concatenate 2-D maps into one :class:`PackedMaps` (one copy; no per-die work)."""
    for i, m in enumerate(maps):
        if np.ndim(m) != 2:
            raise ValueError(f"map {i}: expected a 2-D (h, w) map, got shape {np.shape(m)}")
    heights = np.fromiter((m.shape[0] for m in maps), np.int64, count=len(maps))
    widths = np.fromiter((m.shape[1] for m in maps), np.int64, count=len(maps))
    sizes = heights * widths
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if len(maps) else sizes
    data = (np.concatenate([np.asarray(m, dtype=np.uint8).ravel() for m in maps]) if len(maps)
            else np.zeros(0, np.uint8))
    return PackedMaps(data=data, starts=starts, heights=heights, widths=widths)


def packed_column(table: pa.Table, column: str = "die_map") -> PackedMaps:
    """A binary map column of a wafer table as :class:`PackedMaps`, straight from Arrow's buffers.

    One ``np.frombuffer`` over the column's data buffer and its offsets: no Python object per row.
    Rows must be valid (non-null, ``height * width`` bytes); anything else raises ValueError.
    """
    heights = table.column("height").to_numpy().astype(np.int64)
    widths = table.column("width").to_numpy().astype(np.int64)
    col = table.column(column)
    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if pa.types.is_large_binary(arr.type):
        arr = arr.cast(pa.binary())
    if not pa.types.is_binary(arr.type):
        raise ValueError(f"column {column!r} must be binary, got {arr.type}")
    if arr.null_count:
        raise ValueError(f"column {column!r} has {arr.null_count} null row(s); validate the table first")
    n = len(arr)
    if n == 0:
        return PackedMaps(data=np.zeros(0, np.uint8), starts=heights[:0], heights=heights, widths=widths)
    _, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, np.int32, count=arr.offset + n + 1)[arr.offset:].astype(np.int64)
    lengths = np.diff(offsets)
    bad = np.flatnonzero(lengths != heights * widths)
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"row {i}: {column} has {lengths[i]} bytes, expected {heights[i]} x {widths[i]} "
                         f"({bad.size} bad row(s) in all); validate the table first")
    base = int(offsets[0])
    data = (np.frombuffer(data_buf, np.uint8, count=int(offsets[-1]) - base, offset=base) if data_buf
            else np.zeros(0, np.uint8))
    return PackedMaps(data=data, starts=offsets[:-1] - base, heights=heights, widths=widths)


# -- batches -------------------------------------------------------------------------------------
def batches(maps: PackedMaps, *, batch_size: int, max_batch_pixels: int, multiple: int,
            fixed: int | None) -> Iterator[tuple[np.ndarray, int, int]]:
    """(row indices, H, W): one padded shape per batch, at most batch_size maps and ~max pixels."""
    if batch_size < 1 or max_batch_pixels < 1:
        raise ValueError(f"batch_size and max_batch_pixels must be >= 1, got {batch_size}, {max_batch_pixels}")
    groups = size_buckets(maps.heights, maps.widths, batch_size=max(1, len(maps)), multiple=multiple, fixed=fixed)
    for group in groups:
        idx = np.asarray(group, dtype=np.int64)
        H, W = padded_shape(int(maps.heights[idx].max()), int(maps.widths[idx].max()), multiple=multiple,
                            fixed=fixed)
        per_batch = max(1, min(batch_size, max_batch_pixels // (H * W)))
        for start in range(0, idx.size, per_batch):
            yield idx[start:start + per_batch], H, W


def gather(maps: PackedMaps, idx: np.ndarray, H: int, W: int) -> np.ndarray:
    """(n, H, W) uint8 die states of rows ``idx``, padded with no-die at the bottom/right."""
    out = np.zeros((idx.size, H, W), np.uint8)
    data = maps.data
    for k, (s, h, w) in enumerate(zip(maps.starts[idx].tolist(), maps.heights[idx].tolist(),
                                      maps.widths[idx].tolist())):
        out[k, :h, :w] = data[s:s + h * w].reshape(h, w)  # one slice copy per map, no per-die work
    return out


def scatter(labels: np.ndarray, maps: PackedMaps, idx: np.ndarray, out: np.ndarray) -> None:
    """Crop each (H, W) label map back to its (h, w) and write it at its place in ``out``."""
    for k, (s, h, w) in enumerate(zip(maps.starts[idx].tolist(), maps.heights[idx].tolist(),
                                      maps.widths[idx].tolist())):
        out[s:s + h * w].reshape(h, w)[...] = labels[k, :h, :w]


# -- the forward passes --------------------------------------------------------------------------
def label_packed(
    net: nn.Module,
    maps: PackedMaps,
    *,
    channels_last: bool,
    batch_size: int = DEFAULT_BATCH,
    max_batch_pixels: int = DEFAULT_BATCH_PIXELS,
    device: str | torch.device = "cpu",
    multiple: int = 32,
    fixed: int | None = None,
    bf16: bool | None = None,
    num_threads: int | None = None,
    tta: str = "none",
) -> np.ndarray:
    """uint8 labels laid out like ``maps.data``, by ``net`` as it is (already made by ``fast_module``).

    ``channels_last`` says which input layout ``net`` was made for. ``net`` is only read, so one
    net can serve concurrent callers. ``tta``: ``mirror`` averages each map with its mirror image
    (:func:`fcn_core.inference.runtime.tta_scores`).
    """
    device = resolve_device(device) if isinstance(device, str) else device
    if maps.data.size and int(maps.data.max()) >= N_DIE_STATES:
        raise ValueError("die states must be 0 (no die), 1 (pass) or 2 (fail), found "
                         f"{int(maps.data.max())}")
    bf16 = inference_bf16(device, bf16)
    out = np.zeros_like(maps.data)
    with intra_op_threads(num_threads), torch.inference_mode():
        for idx, H, W in batches(maps, batch_size=batch_size, max_batch_pixels=max_batch_pixels,
                                 multiple=multiple, fixed=fixed):
            die = torch.from_numpy(gather(maps, idx, H, W)).to(device, non_blocking=True)
            x = one_hot_channels_last(die)
            if not channels_last:
                x = x.contiguous()
            with autocast_for(device, bf16=bf16):
                logits = tta_scores(net, x, list(zip(maps.heights[idx].tolist(), maps.widths[idx].tolist())), tta)
            labels = class_ids(logits).to(torch.uint8).masked_fill_(die != FAIL, 0)
            scatter(labels.cpu().numpy(), maps, idx, out)
    return out


def predict_packed(
    model: nn.Module,
    maps: PackedMaps,
    *,
    batch_size: int = DEFAULT_BATCH,
    max_batch_pixels: int = DEFAULT_BATCH_PIXELS,
    device: str | torch.device = "cpu",
    multiple: int = 32,
    fixed: int | None = None,
    bf16: bool | None = None,
    channels_last: bool = True,
    subpixel: bool = True,
    num_threads: int | None = None,
    tta: str = "none",
) -> np.ndarray:
    """uint8 labels laid out like ``maps.data`` (label_map layout per map; 0 off fail dies).

    Runs a :func:`fast_module` copy of ``model`` made for this call; ``model`` is left as it is
    (a :class:`fcn_core.scorer.Scorer` keeps its copy between calls).
    """
    net = fast_module(model, channels_last=channels_last, subpixel=subpixel)
    return label_packed(net, maps, channels_last=channels_last, batch_size=batch_size,
                        max_batch_pixels=max_batch_pixels, device=device, multiple=multiple, fixed=fixed, bf16=bf16,
                        num_threads=num_threads, tta=tta)


def predict_maps(model: nn.Module, die_maps: Sequence[np.ndarray], **options) -> list[np.ndarray]:
    """uint8 label maps (label_map layout) for each die map, in input order.

    Options as :func:`predict_packed`: ``bf16`` autocasts to bfloat16 (None: :func:`inference_bf16`
    decides); ``channels_last`` and ``subpixel`` choose the fast copy's layout and upsamplers;
    ``max_batch_pixels`` caps the padded dies per forward pass, so batches of large maps hold
    fewer maps; ``num_threads`` sets torch intra-op threads for this call only.
    """
    maps = pack_maps(die_maps)
    return maps.unpack(predict_packed(model, maps, **options))
