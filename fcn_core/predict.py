"""Inference: die maps in, per-die pattern labels out (the code the nightly flow runs).

Pass dies are background by definition and no-die positions carry no label, so predictions are
forced to background everywhere except on fail dies.

Built for throughput on small CPUs (measurements and the reasons for each default:
docs/performance.md):

- maps travel as one flat uint8 buffer with row offsets (:class:`PackedMaps`), the layout of the
  Parquet ``die_map`` column itself, so a table is decoded and the ``pred_map`` column is built
  without one Python object per wafer;
- batches hold maps of one padded shape (size buckets) and at most ``max_batch_pixels`` padded
  dies, which keeps activations cache-sized for small maps and memory bounded for large ones;
- the network runs channels-last (oneDNN's fast layout for narrow convolutions) with the one-hot
  input built channels-last directly, transposed convs run as conv + pixel shuffle, and bf16
  autocast is on where the hardware computes bf16 natively.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from fcn_core.config import Config
from fcn_core.padding import N_DIE_STATES, Batch, padded_shape, size_buckets
from fcn_core.table import FAIL, PASS
from fcn_core.verdicts import model_verdict, shaped_maps, verdicts_from_counts

DEFAULT_BATCH = 256
# Padded dies per forward pass: 256 maps of 32 x 32, 64 of 64 x 64. On the bench machine 64 K was
# 15-50% slower, 1 M within noise at 4x the activation memory; it also bounds memory for big maps.
DEFAULT_BATCH_PIXELS = 256 * 32 * 32


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_for(device: torch.device, *, bf16: bool | None = None):
    """bf16 autocast on CUDA by default; on CPU only when asked (see docs/performance.md)."""
    use = (device.type == "cuda") if bf16 is None else bf16
    if not use:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@contextlib.contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, then restore the previous count (None: as is).

    On a shared or oversubscribed CPU, threads > 1 can be many times slower than 1: every operator
    ends in a barrier that waits for a descheduled thread (docs/performance.md).
    """
    if n is None:
        yield
        return
    if n < 1:
        raise ValueError(f"num_threads must be >= 1, got {n}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def class_ids(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(1)`` (first maximum on ties), computed as ``max(1).indices``.

    Same answer; on CPU argmax over the channel dim of an NCHW tensor took a strided slow path,
    6x slower than max (26 vs 4 ms for 64 x 5 x 64 x 64 on the bench machine).
    """
    return logits.max(1).indices


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 in hardware (AVX512-BF16 or AMX-BF16; read from /proc/cpuinfo).

    Without it oneDNN emulates bf16 and autocast is slower than fp32.
    """
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def inference_bf16(device: torch.device, bf16: bool | None) -> bool:
    """Scoring's bf16 choice: as asked, else on CUDA and on CPUs with native bf16.

    Measured on the bench machine (AVX512-BF16): 20-25% faster scoring, 99.9% of fail-die labels
    unchanged and mean IU within 0.0004 of fp32 (docs/performance.md).
    """
    if bf16 is not None:
        return bf16
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())


def batch_labels(model: nn.Module, batch: Batch, device: torch.device, *, bf16: bool | None = None) -> torch.Tensor:
    """(N, H, W) int64 labels on ``device`` for a padded batch, background off fail dies."""
    x = batch.x.to(device, non_blocking=True)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast_for(device, bf16=bf16):
        logits = model(x)
    labels = class_ids(logits)
    die = torch.as_tensor(batch.die).to(device, non_blocking=True)
    return labels.masked_fill_(die != FAIL, 0)


# -- packed maps ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class PackedMaps:
    """N row-major uint8 maps in one flat buffer: map i is ``data[starts[i]:starts[i] + h*w]``."""

    data: np.ndarray  # (total,) uint8
    starts: np.ndarray  # (N,) int64
    heights: np.ndarray  # (N,) int64
    widths: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.starts)

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


# -- the forward passes --------------------------------------------------------------------------
def _batches(maps: PackedMaps, *, batch_size: int, max_batch_pixels: int, multiple: int,
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


def _gather(maps: PackedMaps, idx: np.ndarray, H: int, W: int) -> np.ndarray:
    """(n, H, W) uint8 die states of rows ``idx``, padded with no-die at the bottom/right."""
    out = np.zeros((idx.size, H, W), np.uint8)
    data = maps.data
    for k, (s, h, w) in enumerate(zip(maps.starts[idx].tolist(), maps.heights[idx].tolist(),
                                      maps.widths[idx].tolist())):
        out[k, :h, :w] = data[s:s + h * w].reshape(h, w)  # one slice copy per map, no per-die work
    return out


def _scatter(labels: np.ndarray, maps: PackedMaps, idx: np.ndarray, out: np.ndarray) -> None:
    """Crop each (H, W) label map back to its (h, w) and write it at its place in ``out``."""
    for k, (s, h, w) in enumerate(zip(maps.starts[idx].tolist(), maps.heights[idx].tolist(),
                                      maps.widths[idx].tolist())):
        out[s:s + h * w].reshape(h, w)[...] = labels[k, :h, :w]


def one_hot_channels_last(die: torch.Tensor) -> torch.Tensor:
    """(N, H, W) die states -> float32 (N, 3, H, W) one-hot in channels-last memory, without a copy."""
    states = torch.arange(N_DIE_STATES, device=die.device, dtype=die.dtype)
    return (die.unsqueeze(-1) == states).to(torch.float32).permute(0, 3, 1, 2)


class SubPixelConvTranspose2d(nn.Module):
    """A ``ConvTranspose2d`` with kernel ``T * stride`` computed as conv2d + pixel_shuffle + crop.

    The same function (equal up to float rounding): output phase (ry, rx) of a stride-s transposed
    conv is a T x T correlation of the input with every s-th kernel tap, so one conv2d with
    ``C_out * s * s`` channels computes all phases and ``pixel_shuffle`` interleaves them. oneDNN
    runs that conv fast, while CPU transposed convs take a slow path: 3x faster for FCN-8s' x8
    upsampler, 6-8x for the x16 / x32 ones (docs/performance.md). Shares the wrapped layer's
    parameters, so it always computes with the current weights.
    """

    def __init__(self, deconv: nn.ConvTranspose2d) -> None:
        super().__init__()
        if not self.supports(deconv):
            raise ValueError(f"cannot rewrite {deconv} as a sub-pixel convolution")
        self.deconv = deconv

    @staticmethod
    def supports(layer: nn.Module) -> bool:
        if type(layer) is not nn.ConvTranspose2d:
            return False
        (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
        return (kh == kw and sh == sw and ph == pw and kh % sh == 0 and layer.groups == 1
                and tuple(layer.dilation) == (1, 1) and tuple(layer.output_padding) == (0, 0)
                and layer.padding_mode == "zeros")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.deconv
        w = d.weight  # (C_in, C_out, k, k)
        c_in, c_out, k, _ = w.shape
        s, p = d.stride[0], d.padding[0]
        taps = k // s
        # conv weight [(co, ry, rx), ci, by, bx] = w[ci, co, s*(taps-1-by) + ry, s*(taps-1-bx) + rx]
        wc = (w.reshape(c_in, c_out, taps, s, taps, s).flip(2, 4).permute(1, 3, 5, 0, 2, 4)
              .reshape(c_out * s * s, c_in, taps, taps))
        if x.is_contiguous(memory_format=torch.channels_last):
            wc = wc.contiguous(memory_format=torch.channels_last)
        y = F.pixel_shuffle(F.conv2d(x, wc, padding=taps - 1), s)
        h, w_in = x.shape[-2:]
        y = y[..., p:p + s * (h - 1) + k - 2 * p, p:p + s * (w_in - 1) + k - 2 * p]
        return y if d.bias is None else y + d.bias.view(1, -1, 1, 1).to(y.dtype)


def inference_view(model: nn.Module) -> nn.Module:
    """``model`` with its top-level transposed convs computed as :class:`SubPixelConvTranspose2d`.

    A shallow copy: every layer and parameter is shared with ``model`` (no weights are copied,
    ``model`` itself is untouched). Models without such layers are returned as they are.
    """
    swap = {name: layer for name, layer in model.named_children() if SubPixelConvTranspose2d.supports(layer)}
    if not swap:
        return model
    view = copy.copy(model)
    view._modules = dict(model._modules)  # own module table; the layers in it stay shared
    for name, layer in swap.items():
        view._modules[name] = SubPixelConvTranspose2d(layer)
    return view


def prepare_model(model: nn.Module, *, channels_last: bool, subpixel: bool = True) -> nn.Module:
    """The module to run: eval mode, channels-last weights when asked (in place; numbers unchanged)
    and, with ``subpixel``, transposed convs computed by :func:`inference_view`."""
    model.eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return inference_view(model) if subpixel else model


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
) -> np.ndarray:
    """uint8 labels laid out like ``maps.data`` (label_map layout per map; 0 off fail dies)."""
    device = resolve_device(device) if isinstance(device, str) else device
    if maps.data.size and int(maps.data.max()) >= N_DIE_STATES:
        raise ValueError("die states must be 0 (no die), 1 (pass) or 2 (fail), found "
                         f"{int(maps.data.max())}")
    with torch.no_grad():  # not inference_mode: converted weights must stay usable by autograd later
        net = prepare_model(model, channels_last=channels_last, subpixel=subpixel)
    bf16 = inference_bf16(device, bf16)
    out = np.zeros_like(maps.data)
    with intra_op_threads(num_threads), torch.inference_mode():
        for idx, H, W in _batches(maps, batch_size=batch_size, max_batch_pixels=max_batch_pixels,
                                  multiple=multiple, fixed=fixed):
            _predict_batch(net, maps, idx, H, W, out, device=device, bf16=bf16, channels_last=channels_last)
    return out


def _predict_batch(net: nn.Module, maps: PackedMaps, idx: np.ndarray, H: int, W: int, out: np.ndarray, *,
                   device: torch.device, bf16: bool, channels_last: bool) -> None:
    """Score rows ``idx`` (one padded shape H x W) and write their labels into ``out``."""
    die = torch.from_numpy(_gather(maps, idx, H, W)).to(device, non_blocking=True)
    x = one_hot_channels_last(die)
    if not channels_last:
        x = x.contiguous()
    with autocast_for(device, bf16=bf16):
        logits = net(x)
    labels = class_ids(logits).to(torch.uint8).masked_fill_(die != FAIL, 0)
    _scatter(labels.cpu().numpy(), maps, idx, out)


def predict_maps(
    model: nn.Module,
    die_maps: Sequence[np.ndarray],
    *,
    batch_size: int = DEFAULT_BATCH,
    device: str | torch.device = "cpu",
    multiple: int = 32,
    fixed: int | None = None,
    bf16: bool | None = None,
    channels_last: bool = True,
    subpixel: bool = True,
    max_batch_pixels: int = DEFAULT_BATCH_PIXELS,
    num_threads: int | None = None,
) -> list[np.ndarray]:
    """uint8 label maps (label_map layout) for each die map, in input order.

    ``bf16``: autocast to bfloat16 (None: :func:`inference_bf16` decides). ``channels_last``: run the network in
    channels-last layout (converts the model's weights in place). ``subpixel``: compute transposed
    convs as conv + pixel shuffle (:func:`inference_view`). ``max_batch_pixels`` caps the padded
    dies per forward pass, so batches of large maps hold fewer maps. ``num_threads``: torch
    intra-op threads for this call only (:func:`intra_op_threads`; None: torch's setting).
    """
    maps = pack_maps(die_maps)
    labels = predict_packed(model, maps, batch_size=batch_size, max_batch_pixels=max_batch_pixels, device=device,
                            multiple=multiple, fixed=fixed, bf16=bf16, channels_last=channels_last,
                            subpixel=subpixel, num_threads=num_threads)
    return maps.unpack(labels)


# -- the predictions table -----------------------------------------------------------------------
def column_name(class_name: str) -> str:
    """'local zone' -> 'dies_local_zone'."""
    return "dies_" + re.sub(r"\W+", "_", class_name.strip().lower())


def _per_map_counts(maps: PackedMaps, labels: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, n_classes) fail dies per predicted class and (N,) pass dies, by one bincount each."""
    owner = np.repeat(np.arange(len(maps), dtype=np.int64), maps.heights * maps.widths)
    fail = maps.data == FAIL
    picked = labels[fail].astype(np.int64)
    if picked.size and picked.max() >= n_classes:
        raise ValueError(f"predicted class ids must lie in 0..{n_classes - 1}, found {picked.max()}")
    dies = np.bincount(owner[fail] * n_classes + picked, minlength=len(maps) * n_classes)
    n_pass = np.bincount(owner[maps.data == PASS], minlength=len(maps))
    return dies.reshape(len(maps), n_classes), n_pass


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
    bf16: bool | None = None,
    channels_last: bool = True,
    subpixel: bool = True,
    max_batch_pixels: int = DEFAULT_BATCH_PIXELS,
    num_threads: int | None = None,
) -> pa.Table:
    """The predictions table: one row per (valid) input wafer.

    Columns: wafer_id, lot_id, captured_at, height, width, pred_map, dies_<class> per class,
    fail_dies, yield, dominant_pattern, dominant_share, model_name, model_version (+ ``extra``
    string columns such as run ids). ``pred_map`` shares the input's row offsets: it is built
    from the flat label buffer without a Python object per wafer. Speed options as
    :func:`predict_maps`.
    """
    maps = packed_column(table, "die_map")
    labels = predict_packed(model, maps, batch_size=batch_size, max_batch_pixels=max_batch_pixels, device=device,
                            multiple=cfg.data.pad_multiple, fixed=cfg.data.pad_fixed, bf16=bf16,
                            channels_last=channels_last, subpixel=subpixel, num_threads=num_threads)
    verdict = model_verdict(model, cfg.verdict)
    if verdict.min_elongation_by_class:
        # shape rules edit the flat label buffer through per-map views, so pred_map shows what is counted
        shaped_maps(maps.unpack(labels), maps.unpack(), class_names=cfg.class_names, verdict=verdict, inplace=True)
    dies, n_pass = _per_map_counts(maps, labels, cfg.n_classes)
    verdicts = verdicts_from_counts(dies, class_names=cfg.class_names, verdict=verdict)
    n = len(maps)
    on_wafer = verdicts.fail_dies + n_pass
    offsets = np.append(maps.starts, maps.data.size).astype(np.int32)
    columns: dict[str, pa.Array] = {
        "wafer_id": table.column("wafer_id"),
        "lot_id": table.column("lot_id"),
        "captured_at": table.column("captured_at"),
        "height": table.column("height"),
        "width": table.column("width"),
        "pred_map": pa.BinaryArray.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(labels)]),
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
