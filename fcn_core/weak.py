"""Weak labels for real wafer maps, and the fine-tune / held-out split they need.

Real maps (WM-811K, MixedWM38) carry one label per wafer, no per-die masks.
``train.finetune.weak_labels: wafer_labels`` (:func:`wafer_label_table` + ``fcn_core.weak_loss``)
never invents die targets: it trains a wafer-level loss jointly with the synthetic die loss. The
default, ``both``, adds the pseudo-masks below as die targets of the same real maps (redrawn once
mid-stage from the model being trained: ``WeakSet.redrawn``). Two ways turn the label into die
targets:

- ``all_fail_dies`` (:func:`weak_label_table`): every fail die of a single-label wafer gets that
  label's class (``Edge-Ring`` -> ring, ...), every fail die of a ``None``/``Random`` wafer
  background; mixes are dropped. Noisy: the random fails of an Edge-Ring wafer become "ring" too.
- ``pseudo_masks`` (:func:`pseudo_mask_table`): a model trained on synthetic maps only predicts the
  real map; a fail die is taught pattern k only if k is among the wafer's labelled patterns and the
  model gives k at least ``min_prob``; a die it confidently calls background is taught background;
  every other fail die is ignored (``IGNORE_LABEL``, never taught). ``None``/``Random`` wafers teach
  background on every fail die. Mixes are kept: each labelled pattern may be taught. A ``LineSeed``
  also teaches a labelled scratch's faint dies when they form a line (thin patterns the starting
  model barely sees would otherwise never be taught).

``IGNORE_LABEL`` (255) lives only in the internal fine-tune file: ``fcn_core.padding.train_targets``
passes it through as ``IGNORE_INDEX``; user tables with it are rejected by ``fcn_core.validate``.

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

import torch

from fcn_core.config import LineSeedConfig, SplitConfig
from fcn_core.ingest import assign_splits
from fcn_core.padding import IGNORE_INDEX, collate, size_buckets
from fcn_core.shapes import long_groups
from fcn_core.table import FAIL, die_maps
from fcn_core.stages import NO_PATTERN
from fcn_core.verdicts import NONE, PATTERN_SEPARATOR, UNLABELLED, dataset_label_patterns, map_dataset_label

IGNORE_LABEL = IGNORE_INDEX  # label_map byte of a fail die that is never taught (internal files only)
RANDOM_GROUP = "random"  # cap group of the wafers labelled Random (heavy random fails, no pattern)


@dataclass
class WeakLabelReport:
    kept: dict[str, int] = field(default_factory=dict)  # mapped class name -> wafers
    dropped: dict[str, int] = field(default_factory=dict)  # dataset label (or UNLABELLED) -> wafers
    dies: dict[str, int] = field(default_factory=dict)  # pseudo-masks: fail dies taught background/pattern, ignored


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
    keep = _capped(by_class, max_per_class, seed, report)
    kept = table.take(pa.array(keep, pa.int64()))
    weak = []
    for die, m in zip(die_maps(kept), (mapped[i] for i in keep)):
        value = 0 if m == NO_PATTERN else class_id[m]
        weak.append(np.where(die == FAIL, value, 0).astype(np.uint8).tobytes())
    column = kept.schema.get_field_index("label_map")
    kept = kept.set_column(column, kept.schema.field(column), pa.array(weak, pa.binary()))
    return kept, report


@dataclass(frozen=True)
class LineSeed:
    """A labelled line-shaped pattern's faint dies (``fcn_core.config.LineSeedConfig``, by class id)."""

    class_id: int
    min_prob: float
    min_elongation: float
    min_dies: int

    @classmethod
    def from_config(cls, seed: LineSeedConfig | None, class_names: Sequence[str]) -> "LineSeed | None":
        if seed is None:
            return None
        return cls(list(class_names).index(seed.class_name), seed.min_prob, seed.min_elongation, seed.min_dies)

    def dies(self, die: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """Bool map: fail dies with at least ``min_prob`` of the class, in long enough, thin enough groups."""
        return long_groups((die == FAIL) & (probs[self.class_id] >= self.min_prob), min_dies=self.min_dies,
                           min_elongation=self.min_elongation)


def pseudo_mask(die: np.ndarray, probs: np.ndarray, allowed: set[int], *, min_prob: float,
                line_seed: LineSeed | None = None) -> np.ndarray:
    """uint8 label map of one real wafer from a model's softmax ``probs`` (C, H, W) over its map.

    ``allowed``: the class ids of the wafer's labelled patterns (empty: a None/Random wafer, whose
    fail dies are all taught background). Otherwise a fail die is taught its most likely class if
    that class is background or in ``allowed`` and has at least ``min_prob``; else IGNORE_LABEL.
    ``line_seed``: when its class is in ``allowed``, its :meth:`LineSeed.dies` are taught that class
    whatever else they would be. Pass dies and off-wafer cells are 0 (the loss never sees them).
    """
    fail = die == FAIL
    if not allowed:
        return np.zeros(die.shape, np.uint8)
    best = probs.argmax(axis=0)
    confident = np.take_along_axis(probs, best[None], axis=0)[0] >= min_prob
    teachable = np.isin(best, sorted(allowed | {0})) & confident
    out = np.where(teachable, best, IGNORE_LABEL).astype(np.uint8)
    if line_seed is not None and line_seed.class_id in allowed:
        out[line_seed.dies(die, probs)] = line_seed.class_id
    out[~fail] = 0
    return out


def taught_dies(die: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> dict[str, int]:
    """Fail dies the masks teach background, teach a pattern, and ignore."""
    taught: Counter = Counter({"background": 0, "pattern": 0, "ignored": 0})
    for d, m in zip(die, masks):
        fail = m[d == FAIL]
        taught["background"] += int((fail == 0).sum())
        taught["pattern"] += int(((fail > 0) & (fail != IGNORE_LABEL)).sum())
        taught["ignored"] += int((fail == IGNORE_LABEL).sum())
    return dict(taught)


@torch.no_grad()
def softmax_maps(model: torch.nn.Module, die: Sequence[np.ndarray], *, device: str | torch.device = "cpu",
                 batch_size: int = 128, multiple: int = 32, fixed: int | None = None) -> list[np.ndarray]:
    """(C, h, w) float32 class probabilities of every die map (cropped back to its size), in input order."""
    was_training = model.training
    model.eval()
    out: list[np.ndarray | None] = [None] * len(die)
    for idx in size_buckets([d.shape[0] for d in die], [d.shape[1] for d in die], batch_size=batch_size,
                            multiple=multiple, fixed=fixed):
        batch = collate([die[i] for i in idx], None, multiple=multiple, fixed=fixed)
        probs = torch.softmax(model(batch.x.to(device)).float(), dim=1).cpu().numpy()
        for j, i in enumerate(idx):
            h, w = batch.sizes[j]
            out[i] = probs[j, :, :h, :w]
    model.train(was_training)
    return out  # type: ignore[return-value]


def label_patterns(table: pa.Table, class_names: Sequence[str]) -> list[set[int] | None]:
    """Per row, the class ids of the wafer label's patterns (empty for None/Random; None: excluded)."""
    class_id = {name: i for i, name in enumerate(class_names)}
    out: list[set[int] | None] = []
    for label in table.column("wafer_label").to_pylist():
        patterns = dataset_label_patterns(label)
        if patterns is None:
            out.append(None)
            continue
        unknown = sorted(patterns - {NONE} - set(class_id))
        if unknown:
            raise ValueError(f"dataset label {label!r} means {unknown}, not configured classes {list(class_names)}")
        out.append({class_id[p] for p in patterns - {NONE}})
    return out


def pseudo_mask_table(
    table: pa.Table,
    model: torch.nn.Module,
    *,
    class_names: Sequence[str],
    min_prob: float,
    line_seed: LineSeed | None = None,
    max_per_class: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    multiple: int = 32,
    fixed: int | None = None,
) -> tuple[pa.Table, WeakLabelReport]:
    """Rows with a usable dataset label (mixes included), ``label_map`` = :func:`pseudo_mask`.

    ``max_per_class`` caps the wafers per label pattern set ('ring', 'local zone+ring', 'none', ...)
    with a seeded sample. ``report.kept`` counts wafers per pattern set; ``report.dies`` counts the
    fail dies taught background, taught a pattern and ignored.
    """
    if "wafer_label" not in table.column_names:
        raise ValueError("pseudo-masks need a wafer_label column (the dataset's wafer-level label)")
    allowed = label_patterns(table, class_names)
    report = WeakLabelReport()
    keep = _capped(_pattern_sets(table, allowed, class_names, report), max_per_class, seed, report)
    kept = table.take(pa.array(keep, pa.int64()))
    die = die_maps(kept)
    probs = softmax_maps(model, die, device=device, multiple=multiple, fixed=fixed)
    masks = [pseudo_mask(d, p, allowed[i], min_prob=min_prob, line_seed=line_seed)
             for d, p, i in zip(die, probs, keep)]
    report.dies = taught_dies(die, masks)
    column = kept.schema.get_field_index("label_map")
    kept = kept.set_column(column, kept.schema.field(column), pa.array([m.tobytes() for m in masks], pa.binary()))
    return kept, report


def wafer_label_table(
    table: pa.Table,
    *,
    class_names: Sequence[str],
    max_per_class: int | None = None,
    max_map_side: int | None = None,
    seed: int = 0,
) -> tuple[pa.Table, WeakLabelReport]:
    """Rows for ``weak_labels=wafer_labels`` (``fcn_core.weak_loss``): a usable dataset label (mixes
    included; unlabelled and Near-full dropped) and at most ``max_map_side`` dies a side; at most
    ``max_per_class`` wafers per label pattern set, Random wafers a set of their own (seeded sample).
    ``label_map`` stays null: the loss reads the wafer label, never a die label."""
    if "wafer_label" not in table.column_names:
        raise ValueError("wafer-level training needs a wafer_label column (the dataset's wafer-level label)")
    allowed = label_patterns(table, class_names)
    report = WeakLabelReport()
    fits = None
    if max_map_side is not None:
        fits = np.maximum(np.asarray(table.column("height")), np.asarray(table.column("width"))) <= max_map_side
        too_big = sum(a is not None and not f for a, f in zip(allowed, fits))
        if too_big:
            report.dropped[f"over {max_map_side} dies a side"] = int(too_big)
    keep = _capped(_pattern_sets(table, allowed, class_names, report, fits=fits), max_per_class, seed, report)
    kept = table.take(pa.array(keep, pa.int64()))
    column = kept.schema.get_field_index("label_map")
    kept = kept.set_column(column, kept.schema.field(column), pa.nulls(kept.num_rows, pa.binary()))
    return kept, report


def _pattern_sets(table: pa.Table, allowed: list[set[int] | None], class_names: Sequence[str],
                  report: WeakLabelReport, *, fits: Sequence[bool] | None = None) -> dict[str, list[int]]:
    """Row indices by label pattern set ('none', 'ring', 'local zone+ring', ...), with wafers labelled
    Random in a group of their own ('random'): dense random fails without a pattern are a condition
    of their own, 1 in 45 of the no-pattern wafers; sampled with the None wafers, too few of them
    are kept for the model to learn to leave such maps background. Rows whose label is unusable
    (``allowed`` None: unlabelled, Near-full) are counted in ``report.dropped`` by label; rows with ``fits``
    False are left out too (the caller says why in ``report.dropped``)."""
    labels = table.column("wafer_label").to_pylist()
    groups: dict[str, list[int]] = {}
    for i, a in enumerate(allowed):
        if a is None:
            key = str(labels[i]) if labels[i] else UNLABELLED
            report.dropped[key] = report.dropped.get(key, 0) + 1
        elif fits is None or fits[i]:
            key = PATTERN_SEPARATOR.join(class_names[k] for k in sorted(a)) or NONE
            if not a and str(labels[i]).strip().lower() == RANDOM_GROUP:
                key = RANDOM_GROUP
            groups.setdefault(key, []).append(i)
    return groups


def _capped(groups: dict[str, list[int]], max_per_class: int | None, seed: int,
            report: WeakLabelReport) -> list[int]:
    """Row indices of every group, at most ``max_per_class`` each (seeded sample), sorted; counts in report."""
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for name, rows in sorted(groups.items()):
        if max_per_class is not None and len(rows) > max_per_class:
            rows = sorted(rng.choice(rows, size=max_per_class, replace=False).tolist())
        report.kept[name] = len(rows)
        keep.extend(rows)
    return sorted(keep)
