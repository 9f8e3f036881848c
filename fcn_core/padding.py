"""Padding preprocessing, the seed deck's way: pad maps so repeated pooling divides evenly, crop back.

A 56 x 53 map is padded at the bottom/right to 64 x 64 (a multiple of 32, or a fixed square size),
fed to the network as three one-hot channels (no die / pass / fail) and the output is cropped back
with ``[..., :h, :w]``. Padding is no-die, so it is ignored by the loss and the metrics like any
off-wafer position. Batches hold maps of one padded shape (size buckets), so a 26 x 26 map is never
padded to the 212 x 204 of another wafer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from fcn_core.table import FAIL

IGNORE_INDEX = 255  # target value skipped by the loss and by fcn_core.metrics
N_DIE_STATES = 3  # no die, pass, fail -> input channels

ArrayLike = TypeVar("ArrayLike", np.ndarray, torch.Tensor)


def _round_up(x: np.ndarray | int, multiple: int) -> np.ndarray | int:
    return -(-x // multiple) * multiple


def padded_shape(h: int, w: int, *, multiple: int = 32, fixed: int | None = None) -> tuple[int, int]:
    """The (H, W) a map of ``h x w`` is padded to: each side rounded up to ``multiple``, or ``fixed``."""
    if h < 1 or w < 1:
        raise ValueError(f"map size must be at least 1 x 1, got {h} x {w}")
    if fixed is not None:
        if fixed < max(h, w):
            raise ValueError(f"fixed pad size {fixed} is smaller than a {h} x {w} map")
        return fixed, fixed
    if multiple < 1:
        raise ValueError(f"pad multiple must be >= 1, got {multiple}")
    return int(_round_up(h, multiple)), int(_round_up(w, multiple))


def pad_map(arr: ArrayLike, H: int, W: int) -> ArrayLike:
    """Pad a (..., h, w) numpy array or tensor at the bottom/right with 0 (no die) to (..., H, W)."""
    if arr.ndim < 2:
        raise ValueError(f"expected a (..., h, w) map, got shape {tuple(arr.shape)}")
    h, w = arr.shape[-2:]
    if H < h or W < w:
        raise ValueError(f"cannot pad a {h} x {w} map to the smaller {H} x {W}")
    shape = (*arr.shape[:-2], H, W)
    out = arr.new_zeros(shape) if isinstance(arr, torch.Tensor) else np.zeros(shape, dtype=arr.dtype)
    out[..., :h, :w] = arr
    return out


def crop_map(arr: ArrayLike, h: int, w: int) -> ArrayLike:
    """Undo :func:`pad_map`: the top-left (..., h, w) of a padded map or network output."""
    H, W = arr.shape[-2:]
    if h > H or w > W:
        raise ValueError(f"cannot crop a {H} x {W} map to the larger {h} x {w}")
    return arr[..., :h, :w]


def _as_tensor(arr: np.ndarray | torch.Tensor) -> torch.Tensor:
    return arr if isinstance(arr, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(arr))


def one_hot_dies(die: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, H, W) die states 0/1/2 -> float32 (N, 3, H, W) one-hot (no die, pass, fail).

    Padding (0) is encoded as no die. A single (H, W) map gives (3, H, W).
    """
    d = _as_tensor(die)
    if d.ndim < 2 or d.dtype.is_floating_point or d.dtype == torch.bool:
        raise ValueError(f"expected integer die states of shape (N, H, W), got {d.dtype} {tuple(d.shape)}")
    if d.numel() and (int(d.max()) >= N_DIE_STATES or int(d.min()) < 0):
        raise ValueError("die states must be 0 (no die), 1 (pass) or 2 (fail)")
    states = torch.arange(N_DIE_STATES, device=d.device, dtype=d.dtype).view(N_DIE_STATES, 1, 1)
    return (d.unsqueeze(-3) == states).to(torch.float32)


def train_targets(die: np.ndarray | torch.Tensor, label: np.ndarray | torch.Tensor) -> torch.Tensor:
    """int64 targets: the label on fail dies, IGNORE_INDEX on pass dies, off-wafer and padding.

    Pass dies are background by definition, so the network is neither trained nor scored on them.
    """
    d, lab = _as_tensor(die), _as_tensor(label)
    if d.shape != lab.shape:
        raise ValueError(f"die map {tuple(d.shape)} and label map {tuple(lab.shape)} differ in shape")
    ignore = torch.full_like(lab, IGNORE_INDEX, dtype=torch.int64)
    return torch.where(d == FAIL, lab.to(torch.int64), ignore)


@dataclass
class Batch:
    """Maps padded to one common shape. ``sizes`` are the original (h, w) for cropping back."""

    x: torch.Tensor  # (N, 3, H, W) float32 one-hot
    die: torch.Tensor  # (N, H, W) uint8, padding = 0
    target: torch.Tensor | None  # (N, H, W) int64, IGNORE_INDEX off fail dies; None without labels
    sizes: list[tuple[int, int]]

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(move(self.x), move(self.die), move(self.target), list(self.sizes))

    def pin_memory(self) -> "Batch":
        """Page-locked copies, so that ``to(cuda, non_blocking=True)`` really is asynchronous."""
        pin = lambda t: None if t is None else t.pin_memory()  # noqa: E731
        return Batch(pin(self.x), pin(self.die), pin(self.target), list(self.sizes))


def collate(
    die_maps: Sequence[np.ndarray],
    label_maps: Sequence[np.ndarray | None] | None,
    *,
    multiple: int = 32,
    fixed: int | None = None,
) -> Batch:
    """Pad every map to the batch's common padded shape and encode inputs and targets.

    A ``None`` entry in ``label_maps`` (a row without die-level labels) gets an all-ignored target.
    """
    n = len(die_maps)
    if n == 0:
        raise ValueError("cannot collate an empty batch")
    if label_maps is not None and len(label_maps) != n:
        raise ValueError(f"{n} die maps but {len(label_maps)} label maps")
    sizes = [(int(m.shape[0]), int(m.shape[1])) for m in die_maps]
    H, W = padded_shape(max(h for h, _ in sizes), max(w for _, w in sizes), multiple=multiple, fixed=fixed)
    die = np.zeros((n, H, W), dtype=np.uint8)
    label = np.zeros((n, H, W), dtype=np.uint8) if label_maps is not None else None
    for i, (m, (h, w)) in enumerate(zip(die_maps, sizes)):  # per-map copy; no per-die work
        die[i, :h, :w] = m
        if label is not None and label_maps[i] is not None:
            lab = label_maps[i]
            if lab.shape != m.shape:
                raise ValueError(f"map {i}: label map {lab.shape} differs from die map {m.shape}")
            label[i, :h, :w] = lab
    die_t = torch.from_numpy(die)
    target = None
    if label is not None:
        target = train_targets(die_t, torch.from_numpy(label))
        unlabelled = [i for i, lab in enumerate(label_maps) if lab is None]
        target[unlabelled] = IGNORE_INDEX
    return Batch(x=one_hot_dies(die_t), die=die_t, target=target, sizes=sizes)


def size_buckets(
    heights: Sequence[int] | np.ndarray,
    widths: Sequence[int] | np.ndarray,
    *,
    batch_size: int,
    multiple: int = 32,
    fixed: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
) -> list[list[int]]:
    """Row indices grouped into batches of one padded shape each (batches never mix shapes).

    Without shuffle: shapes in ascending order, indices ascending. With shuffle: indices shuffled
    within each shape and the batches shuffled, deterministically for a seed.
    """
    h = np.asarray(heights, dtype=np.int64)
    w = np.asarray(widths, dtype=np.int64)
    if h.shape != w.shape or h.ndim != 1:
        raise ValueError(f"heights and widths must be 1-D and equal in length, got {h.shape} and {w.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if h.size == 0:
        return []
    if h.min() < 1 or w.min() < 1:
        raise ValueError("map sizes must be at least 1 x 1")
    if fixed is not None:
        too_big = np.flatnonzero(np.maximum(h, w) > fixed)
        if too_big.size:
            i = int(too_big[0])
            raise ValueError(f"fixed pad size {fixed} is smaller than map {i} ({h[i]} x {w[i]}) "
                             f"and {too_big.size - 1} other(s)")
        ph = pw = np.full_like(h, fixed)
    else:
        if multiple < 1:
            raise ValueError(f"pad multiple must be >= 1, got {multiple}")
        ph, pw = _round_up(h, multiple), _round_up(w, multiple)
    shapes, group = np.unique(np.stack([ph, pw], axis=1), axis=0, return_inverse=True)
    group = group.reshape(-1)
    rng = np.random.default_rng(seed)
    batches: list[list[int]] = []
    for g in range(len(shapes)):  # loop over distinct shapes, not over maps
        idx = np.flatnonzero(group == g)
        if shuffle:
            idx = rng.permutation(idx)
        batches.extend(chunk.tolist() for chunk in np.array_split(idx, range(batch_size, idx.size, batch_size)))
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches
