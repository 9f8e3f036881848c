"""Weak labels for real wafer maps, and the fine-tune / held-out split they need.

Real maps (WM-811K, MixedWM38) carry one label per wafer, no per-die masks. A weak label map
gives every fail die of a single-label wafer that label's class (``Edge-Ring`` -> ring, ...) and
every fail die of a ``None``/``Random`` wafer background. It is noisy (the random fails of an
Edge-Ring wafer become "ring" too), but it teaches the model what real patterns look like.

Honest evaluation needs wafers the model never saw: ``holdout_mask`` splits a real table by a
salted hash of lot_id (wafer_id when there is no lot), so the split is the same in every run and
no lot is on both sides. Fine-tuning uses only the other part; real-map scores use only this one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from fcn_core.config import SplitConfig
from fcn_core.ingest import assign_splits
from fcn_core.table import FAIL, die_maps
from fcn_core.stages import NO_PATTERN
from fcn_core.verdicts import UNLABELLED, map_dataset_label


@dataclass
class WeakLabelReport:
    kept: dict[str, int] = field(default_factory=dict)  # mapped class name -> wafers
    dropped: dict[str, int] = field(default_factory=dict)  # dataset label (or UNLABELLED) -> wafers


def holdout_mask(table: pa.Table, *, fraction: float, salt: str = "wafer-fcn-holdout") -> np.ndarray:
    """Boolean per row: True = held out for evaluation (about ``fraction`` of the lots/wafers)."""
    if not 0 < fraction < 1:
        raise ValueError(f"holdout fraction must lie strictly between 0 and 1, got {fraction}")
    split = SplitConfig(train=1 - fraction, val=0.0, test=fraction, salt=salt)
    return np.asarray(assign_splits(table, split).to_pylist()) == "test"


def weak_label_table(
    table: pa.Table,
    *,
    class_names: Sequence[str],
    max_per_class: int | None = None,
    seed: int = 0,
) -> tuple[pa.Table, WeakLabelReport]:
    """Rows whose dataset label means one pattern (or none), with weak ``label_map``s filled in.

    Dropped: unlabelled wafers, Near-full, and mixes of different patterns (no single label to
    give their dies). ``max_per_class`` keeps a seeded random sample of at most that many wafers
    per mapped class, so the 'none' majority (59 % of WM-811K's labelled maps) does not drown
    the patterns.
    """
    if "wafer_label" not in table.column_names:
        raise ValueError("weak labels need a wafer_label column (the dataset's wafer-level label)")
    class_id = {name: i for i, name in enumerate(class_names)}
    labels = table.column("wafer_label").to_pylist()
    mapped = [map_dataset_label(x) for x in labels]
    unknown = sorted({m for m in mapped if m is not None and m != NO_PATTERN and m not in class_id})
    if unknown:
        raise ValueError(f"dataset labels map to {unknown}, which are not configured classes {list(class_names)}")
    report = WeakLabelReport()
    report.dropped = dict(Counter(str(labels[i]) if labels[i] else UNLABELLED
                                  for i, m in enumerate(mapped) if m is None))
    by_class: dict[str, list[int]] = {}
    for i, m in enumerate(mapped):
        if m is not None:
            by_class.setdefault(m, []).append(i)
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for name, rows in sorted(by_class.items()):
        if max_per_class is not None and len(rows) > max_per_class:
            rows = sorted(rng.choice(rows, size=max_per_class, replace=False).tolist())
        report.kept[name] = len(rows)
        keep.extend(rows)
    keep.sort()
    kept = table.take(pa.array(keep, pa.int64()))
    weak = []
    for die, m in zip(die_maps(kept), (mapped[i] for i in keep)):
        value = 0 if m == NO_PATTERN else class_id[m]
        weak.append(np.where(die == FAIL, value, 0).astype(np.uint8).tobytes())
    column = kept.schema.get_field_index("label_map")
    kept = kept.set_column(column, kept.schema.field(column), pa.array(weak, pa.binary()))
    return kept, report
