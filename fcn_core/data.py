"""In-memory wafer sets and size-bucketed batches for training, evaluation and scoring.

Wafer maps are tiny (median 27 x 27 dies), so a whole split fits in memory as numpy maps; all file
I/O happens before training starts, never inside the training step.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import pyarrow as pa

from fcn_core.padding import Batch, collate, size_buckets
from fcn_core.table import die_maps, label_maps


@dataclass
class WaferSet:
    """Die maps (and label maps, when known) of a set of wafers, in table order."""

    wafer_ids: list[str]
    die: list[np.ndarray]
    label: list[np.ndarray | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.label:
            self.label = [None] * len(self.die)
        if not (len(self.wafer_ids) == len(self.die) == len(self.label)):
            raise ValueError("wafer_ids, die and label must have the same length")

    @classmethod
    def from_table(cls, table: pa.Table) -> "WaferSet":
        return cls(
            wafer_ids=table.column("wafer_id").to_pylist(),
            die=die_maps(table),
            label=label_maps(table),
        )

    def __len__(self) -> int:
        return len(self.die)

    @property
    def heights(self) -> np.ndarray:
        return np.fromiter((m.shape[0] for m in self.die), dtype=np.int64, count=len(self.die))

    @property
    def widths(self) -> np.ndarray:
        return np.fromiter((m.shape[1] for m in self.die), dtype=np.int64, count=len(self.die))

    @property
    def labelled(self) -> bool:
        return all(m is not None for m in self.label)

    def subset(self, indices: Sequence[int]) -> "WaferSet":
        return WaferSet(
            wafer_ids=[self.wafer_ids[i] for i in indices],
            die=[self.die[i] for i in indices],
            label=[self.label[i] for i in indices],
        )

    def require_labels(self, purpose: str) -> None:
        missing = sum(m is None for m in self.label)
        if missing:
            raise ValueError(f"{purpose} needs label maps, but {missing} of {len(self)} wafers have none")

    def batches(
        self,
        *,
        batch_size: int,
        multiple: int = 32,
        fixed: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
        augment: bool = False,
        with_targets: bool = True,
    ) -> Iterator[tuple[list[int], Batch]]:
        """Yield (row indices, Batch) with maps of one padded size per batch.

        Augmentation keeps labels right: flips per wafer, one 90-degree rotation per batch (wafers
        have no preferred orientation; rotating a whole batch keeps its padded shape uniform).
        """
        rng = np.random.default_rng(seed)
        buckets = size_buckets(self.heights, self.widths, batch_size=batch_size, multiple=multiple,
                               fixed=fixed, shuffle=shuffle, seed=seed)
        for idx in buckets:
            dies = [self.die[i] for i in idx]
            labels = [self.label[i] for i in idx] if with_targets else None
            if augment:
                dies, labels = _augment(dies, labels, rng)
            yield idx, collate(dies, labels, multiple=multiple, fixed=fixed)


T = TypeVar("T")
_DONE = object()


def prefetch(items: Iterable[T], *, depth: int = 2, prepare: Callable[[T], T] | None = None) -> Iterator[T]:
    """Yield ``items`` in order while a background thread produces up to ``depth`` of them ahead.

    For CUDA training: numpy collation and augmentation of the next batch (and ``prepare``, e.g.
    pinning its memory) overlap the GPU's work on this one. An exception in the producer is raised
    here; leaving the loop early stops the producer.
    """
    ready: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def offer(item) -> bool:  # False once the consumer has gone away
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer(item if prepare is None else prepare(item)):
                    return
            offer(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises
            offer(exc)

    worker = threading.Thread(target=produce, name="wafer-fcn-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join(timeout=5)


def _augment(
    dies: list[np.ndarray], labels: list[np.ndarray] | None, rng: np.random.Generator
) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    k = int(rng.integers(4))
    flips = rng.integers(2, size=(len(dies), 2)).astype(bool)

    def transform(m: np.ndarray, i: int) -> np.ndarray:
        if flips[i, 0]:
            m = m[::-1]
        if flips[i, 1]:
            m = m[:, ::-1]
        return np.ascontiguousarray(np.rot90(m, k))

    dies = [transform(m, i) for i, m in enumerate(dies)]
    if labels is not None:
        labels = [transform(m, i) for i, m in enumerate(labels)]
    return dies, labels


def class_frequencies(wafers: WaferSet, n_classes: int) -> np.ndarray:
    """Label counts over fail dies (the dies the loss sees)."""
    counts = np.zeros(n_classes, dtype=np.int64)
    for die, label in zip(wafers.die, wafers.label):
        if label is not None:
            counts += np.bincount(label[die == 2], minlength=n_classes)[:n_classes]
    return counts


def balanced_class_weights(counts: np.ndarray) -> np.ndarray:
    """Inverse-square-root frequency weights, normalised to mean 1 over present classes.

    Scratches are under 1% of dies; full inverse frequency over-corrects and makes training noisy.
    """
    counts = counts.astype(np.float64)
    present = counts > 0
    weights = np.ones_like(counts)
    weights[present] = 1.0 / np.sqrt(counts[present] / counts[present].sum())
    weights[present] /= weights[present].mean()
    return weights.astype(np.float32)
