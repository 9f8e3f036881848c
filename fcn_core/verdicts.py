"""Wafer-level verdicts from a segmentation, and their scores against real wafer labels.

A segmentation says, per fail die, which pattern it belongs to. Engineers act on wafers, so each
wafer gets a verdict: the dies per class, the patterns present (those with at least
``verdict.min_dies`` dies and ``verdict.min_share`` of the wafer's fail dies, counted after the
shape rules), the ``patterns`` string (the present patterns in class-id order joined with ``+``,
``"none"`` when none is present: the multi-label verdict) and the dominant pattern (the present
pattern with most dies, ``"none"`` when no pattern is present).

Real data sets label whole wafers with their own names; ``LABEL_MAP`` translates them into this
project's pattern names so verdicts can be scored (``verdict_scores``, ``real_eval_report``).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .config import VerdictConfig
from .shapes import LineRescue, apply_min_elongation
from .stages import NO_PATTERN
from .table import FAIL

NONE = NO_PATTERN  # the verdict of a wafer without a pattern
PATTERN_SEPARATOR = "+"  # joins the names in a ``patterns`` string: 'ring+scratch'
UNLABELLED = "(unlabelled)"  # key of wafers without a dataset label in RealEvalReport.excluded

# Dataset wafer labels (WM-811K failureType, MixedWM38 columns) -> this project's pattern names.
# None = excluded from scoring: a Near-full wafer fails almost every die, so there is no pattern
# region to segment and no pattern the verdict could be right about.
LABEL_MAP: dict[str, str | None] = {
    "Center": "circle",
    "Donut": "ring",
    "Edge-Ring": "ring",
    "Edge-Loc": "local zone",
    "Loc": "local zone",
    "Scratch": "scratch",
    "None": NONE,
    "Random": NONE,
    "Near-full": None,
}
_LABEL_KEYS = {k.lower(): v for k, v in LABEL_MAP.items()}


# -- label mapping ------------------------------------------------------------------------------
def dataset_label_patterns(label: str | None) -> set[str] | None:
    """Pattern names of a dataset label; '+' joins several (MixedWM38). None = excluded.

    Unlabelled wafers (None or '') and any label containing Near-full are excluded. 'none' parts of
    a mix are dropped (Random+Scratch is a scratch). Case-insensitive. Unknown labels raise.
    """
    if label is None or not label.strip():
        return None
    patterns: set[str] = set()
    for part in (p.strip() for p in label.split("+")):
        if part.lower() not in _LABEL_KEYS:
            raise ValueError(f"unknown dataset label {part!r} (in {label!r}); known: {', '.join(LABEL_MAP)}")
        mapped = _LABEL_KEYS[part.lower()]
        if mapped is None:
            return None
        patterns.add(mapped)
    return patterns - {NONE} if patterns != {NONE} else {NONE}


def map_dataset_label(label: str | None) -> str | None:
    """One dataset label -> the single pattern it means, or None when excluded from scoring.

    Excluded: unlabelled, Near-full, and mixes of different patterns (no single true dominant
    pattern). 'Donut+Edge-Ring' maps to 'ring' since both parts do.
    """
    patterns = dataset_label_patterns(label)
    if patterns is None or len(patterns) != 1:
        return None
    return next(iter(patterns))


def verdict_labels(class_names: Sequence[str]) -> list[str]:
    """Labels a verdict can take: 'none' followed by the pattern classes (all but background)."""
    return [NONE, *class_names[1:]]


# -- verdicts -----------------------------------------------------------------------------------
def dies_column(class_name: str) -> str:
    """The column of a class's fail dies in verdict and predictions tables: 'Local-Zone' -> 'dies_local_zone'."""
    return "dies_" + re.sub(r"\W+", "_", class_name.strip().lower())


@dataclass(frozen=True)
class Verdict:
    """One wafer's verdict (a row of ``WaferVerdicts``)."""

    dies: dict[str, int]  # fail dies per predicted class, background included
    fail_dies: int
    dominant_pattern: str
    dominant_share: float
    patterns: str
    patterns_present: list[str]


@dataclass(frozen=True)
class WaferVerdicts:
    """Verdicts of N wafers, column by column.

    ``dies[i, k]`` counts wafer i's fail dies predicted as class k (class 0 = background: fail dies
    no pattern claims). ``dominant_share`` is the dominant pattern's share of the fail dies, 0.0
    when the verdict is 'none'. ``patterns`` is the multi-label verdict: the qualifying patterns
    in class-id order joined with '+' ('ring+scratch'), 'none' when no pattern qualifies.
    ``patterns_present`` lists the same patterns by descending dies (ties: lower class id first).
    """

    class_names: list[str]
    dies: np.ndarray  # (N, n_classes) int64
    fail_dies: np.ndarray  # (N,) int64
    dominant_pattern: list[str]
    dominant_share: np.ndarray  # (N,) float64
    patterns: list[str]
    patterns_present: list[list[str]] = field(repr=False)

    def __len__(self) -> int:
        return len(self.dominant_pattern)

    def __getitem__(self, i: int) -> Verdict:
        return Verdict(
            dies={name: int(n) for name, n in zip(self.class_names, self.dies[i])},
            fail_dies=int(self.fail_dies[i]),
            dominant_pattern=self.dominant_pattern[i],
            dominant_share=float(self.dominant_share[i]),
            patterns=self.patterns[i],
            patterns_present=list(self.patterns_present[i]),
        )

    def __iter__(self) -> Iterator[Verdict]:
        return (self[i] for i in range(len(self)))

    def rows(self) -> list[Verdict]:
        return list(self)

    def columns(self) -> dict[str, list]:
        """Column name -> values, ready for ``pa.table`` or ``pd.DataFrame`` (``dies_<class>``, …)."""
        out: dict[str, list] = {dies_column(name): self.dies[:, k].tolist() for k, name in enumerate(self.class_names)}
        out["fail_dies"] = self.fail_dies.tolist()
        out["dominant_pattern"] = list(self.dominant_pattern)
        out["dominant_share"] = self.dominant_share.tolist()
        out["patterns"] = list(self.patterns)
        out["patterns_present"] = [list(p) for p in self.patterns_present]
        return out

    def to_pandas(self) -> pd.DataFrame:
        return pd.DataFrame(self.columns())


def verdicts_from_counts(dies: np.ndarray, *, class_names: Sequence[str], verdict: VerdictConfig) -> WaferVerdicts:
    """Threshold a (N, n_classes) matrix of fail dies per predicted class into verdicts."""
    dies = np.asarray(dies, dtype=np.int64)
    if len(class_names) < 2:
        raise ValueError(f"class_names {list(class_names)} hold no pattern class besides background")
    if dies.ndim != 2 or dies.shape[1] != len(class_names):
        raise ValueError(f"dies has shape {dies.shape}, expected (N, {len(class_names)}) for classes "
                         f"{list(class_names)}")
    if (dies < 0).any():
        raise ValueError("die counts cannot be negative")
    fail = dies.sum(axis=1)
    patterns = dies[:, 1:]
    share = patterns / np.maximum(fail, 1)[:, None]
    present = _present(patterns, share, class_names=class_names, verdict=verdict)
    if verdict.dies_follow_patterns:  # the dies of absent patterns count as background (same verdicts)
        dies = _kept_dies(dies, present)

    # rank present patterns by dies (absent ones last); the stable sort keeps lower ids first on ties
    order = np.argsort(-np.where(present, patterns, -1), axis=1, kind="stable")
    rows, top = np.arange(len(dies)), order[:, 0]
    has_pattern = present[rows, top]
    names = np.array(class_names[1:], dtype=object)
    dominant = np.where(has_pattern, names[top], NONE).tolist()
    dominant_share = np.where(has_pattern, share[rows, top], 0.0).astype(np.float64)
    ranked_present = np.take_along_axis(present, order, axis=1)
    present_lists = [list(n[p]) for n, p in zip(names[order], ranked_present)]
    return WaferVerdicts(list(class_names), dies, fail, dominant, dominant_share,
                         patterns_strings(present, class_names[1:]), present_lists)


def _present(patterns: np.ndarray, share: np.ndarray, *, class_names: Sequence[str],
             verdict: VerdictConfig) -> np.ndarray:
    """(N, n_patterns) bool: the pattern has at least its min_dies dies and min_share of the fail dies."""
    min_dies, min_share = verdict.thresholds(list(class_names[1:]))  # per pattern, overrides applied
    return (patterns >= np.asarray(min_dies)) & (share >= np.asarray(min_share))


def _kept_dies(dies: np.ndarray, present: np.ndarray) -> np.ndarray:
    """The (N, n_classes) counts with every absent pattern's dies moved to background."""
    absent = ~present
    kept = dies.copy()
    kept[:, 0] += (dies[:, 1:] * absent).sum(axis=1)
    kept[:, 1:][absent] = 0
    return kept


def kept_classes(dies: np.ndarray, *, class_names: Sequence[str], verdict: VerdictConfig) -> np.ndarray:
    """(N, n_classes) bool: the classes a wafer's fail dies may keep; background always, a pattern when
    the verdict finds it on that wafer (all of them unless ``verdict.dies_follow_patterns``)."""
    dies = np.asarray(dies, dtype=np.int64)
    keep = np.ones(dies.shape, dtype=bool)
    if verdict.dies_follow_patterns and len(dies):
        patterns = dies[:, 1:]
        keep[:, 1:] = _present(patterns, patterns / np.maximum(dies.sum(axis=1), 1)[:, None],
                               class_names=class_names, verdict=verdict)
    return keep


def clear_absent_patterns(labels: np.ndarray, keep: np.ndarray, *, sizes: np.ndarray) -> None:
    """Set to background, in place, every die of a flat label buffer (maps one after the other,
    ``sizes`` dies each) whose class its wafer may not keep (``keep``: :func:`kept_classes`)."""
    if keep.all():
        return
    labelled = np.flatnonzero(labels)
    owner = np.searchsorted(np.cumsum(sizes), labelled, side="right")
    labels[labelled[~keep[owner, labels[labelled]]]] = 0


def patterns_strings(present: np.ndarray, pattern_names: Sequence[str]) -> list[str]:
    """One ``patterns`` string per row of a (N, n_patterns) presence matrix: 'ring+scratch' or 'none'.

    Names keep the matrix's column order (class-id order); equal rows share one string.
    """
    present = np.asarray(present, dtype=bool)
    if present.ndim != 2 or present.shape[1] != len(pattern_names):
        raise ValueError(f"presence matrix has shape {present.shape}, expected (N, {len(pattern_names)})")
    if any(PATTERN_SEPARATOR in n for n in pattern_names):
        raise ValueError(f"pattern names {list(pattern_names)} must not contain {PATTERN_SEPARATOR!r}: it joins them")
    if not len(present):
        return []
    rows, which = np.unique(present, axis=0, return_inverse=True)
    text = [PATTERN_SEPARATOR.join(n for n, p in zip(pattern_names, row) if p) or NONE for row in rows]
    return [text[i] for i in which.ravel()]


def parse_patterns(text: str) -> set[str]:
    """The pattern names of a ``patterns`` string ('none' -> the empty set)."""
    return set() if text == NONE else set(text.split(PATTERN_SEPARATOR))


def count_fail_dies(
    pred_maps: Sequence[np.ndarray] | np.ndarray,
    die_maps: Sequence[np.ndarray] | np.ndarray,
    *,
    n_classes: int,
    sizes: np.ndarray | None = None,
) -> np.ndarray:
    """(N, n_classes) fail dies per predicted class: one bincount over all wafers at once.

    The maps are two sequences of (h, w) arrays, or, with ``sizes`` (dies per map, (N,)), two flat
    buffers holding the maps one after the other (the packed layout of a table's map column).
    """
    if sizes is None:
        if len(pred_maps) != len(die_maps):
            raise ValueError(f"{len(pred_maps)} prediction maps but {len(die_maps)} die maps")
        for i, (pred, die) in enumerate(zip(pred_maps, die_maps)):
            if np.shape(pred) != np.shape(die):
                raise ValueError(f"wafer {i}: prediction {np.shape(pred)} and die map {np.shape(die)} differ in shape")
        sizes = np.fromiter((np.size(p) for p in pred_maps), np.int64, count=len(pred_maps))
        pred = np.concatenate([np.ravel(p) for p in pred_maps]) if len(pred_maps) else np.zeros(0, np.uint8)
        die = np.concatenate([np.ravel(d) for d in die_maps]) if len(die_maps) else np.zeros(0, np.uint8)
    else:
        sizes, pred, die = np.asarray(sizes, np.int64), np.ravel(pred_maps), np.ravel(die_maps)
        if not pred.size == die.size == int(sizes.sum()):
            raise ValueError(f"flat maps of {pred.size} predictions and {die.size} dies do not hold maps of "
                             f"{int(sizes.sum())} dies in all")
    fail = np.flatnonzero(die == FAIL)
    labels = pred[fail].astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"predicted class ids on fail dies must lie in 0..{n_classes - 1}, "
                         f"found {labels.min()}..{labels.max()}")
    owner = np.searchsorted(np.cumsum(sizes), fail, side="right")  # the map each fail die lies in
    n = len(sizes)
    return np.bincount(owner * n_classes + labels, minlength=n * n_classes).reshape(n, n_classes)


def shaped_maps(
    pred_maps: Sequence[np.ndarray],
    die_maps: Sequence[np.ndarray],
    *,
    class_names: Sequence[str],
    verdict: VerdictConfig,
    inplace: bool = False,
) -> list[np.ndarray]:
    """The prediction maps with the verdict's shape rules applied (``min_elongation_by_class``).

    These are the maps the products show and count (pred_map, dies per class, verdicts); the
    segmentation scores of ``fcn_core.evaluate`` judge the network's own maps.
    """
    if len(pred_maps) != len(die_maps):
        raise ValueError(f"{len(pred_maps)} prediction maps but {len(die_maps)} die maps")
    rules = verdict.elongation_rules(list(class_names))
    if not rules:
        return list(pred_maps)
    rescue = None if verdict.line_rescue is None else LineRescue(**verdict.line_rescue.model_dump())
    return [apply_min_elongation(p, d, rules, inplace=inplace, rescue=rescue) for p, d in zip(pred_maps, die_maps)]


def follow_patterns(
    pred_maps: Sequence[np.ndarray],
    die_maps: Sequence[np.ndarray],
    *,
    class_names: Sequence[str],
    verdict: VerdictConfig,
    inplace: bool = False,
) -> list[np.ndarray]:
    """The (shaped) prediction maps with every pattern the wafer's verdict does not find set to
    background (``verdict.dies_follow_patterns``), so a map shows what its ``patterns`` says."""
    if not verdict.dies_follow_patterns:
        return list(pred_maps)
    keep = kept_classes(count_fail_dies(pred_maps, die_maps, n_classes=len(class_names)),
                        class_names=class_names, verdict=verdict)
    out = []
    for pred, allowed in zip(pred_maps, keep):
        if not allowed.all():
            pred = pred if inplace else pred.copy()
            pred[~allowed[pred]] = 0
        out.append(pred)
    return out


def wafer_verdicts(
    pred_maps: Sequence[np.ndarray],
    die_maps: Sequence[np.ndarray],
    *,
    class_names: Sequence[str],
    verdict: VerdictConfig,
) -> WaferVerdicts:
    """Per-wafer verdicts from predicted label maps (class ids) and their die maps.

    Only fail dies count: pass and no-die positions are background by definition, whatever the
    prediction says there. The verdict's shape rules apply first (``shaped_maps``).
    """
    shaped = shaped_maps(pred_maps, die_maps, class_names=class_names, verdict=verdict)
    dies = count_fail_dies(shaped, die_maps, n_classes=len(class_names))
    return verdicts_from_counts(dies, class_names=class_names, verdict=verdict)


CALIBRATION_MIN_DIES = (1, 3, 5, 8, 12, 20)
CALIBRATION_MIN_SHARE = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5)


def calibrate_verdict(
    dies: np.ndarray,
    dataset_labels: Sequence[str | None],
    *,
    class_names: Sequence[str],
    source: str,
    min_dies: Sequence[int] = CALIBRATION_MIN_DIES,
    min_share: Sequence[float] = CALIBRATION_MIN_SHARE,
    per_class_sweeps: int = 2,
    min_elongation_by_class: dict[str, float] | None = None,
) -> tuple[VerdictConfig, float]:
    """Verdict thresholds with the best macro-F1 of verdicts against dataset labels.

    First one (min_dies, min_share) pair for every pattern from the grid, then ``per_class_sweeps``
    rounds of coordinate search that retune one pattern's pair at a time (a scratch needs other
    thresholds than a ring). A change is kept only if it is strictly better, so ties keep the
    smaller, shared thresholds. ``dies`` is the (N, n_classes) fail-die count matrix of a model's
    segmentations after the shape rules, which are not searched: pass them as
    ``min_elongation_by_class`` so the result carries them. One pass of the model serves the
    whole search. Calibrate on labelled maps the score will not be reported on (the fine-tune
    part, never the held-out one).
    """
    return _coordinate_search(_single_label_objective(dies, dataset_labels, class_names), class_names=class_names, source=source, min_dies=min_dies,
                              min_share=min_share, per_class_sweeps=per_class_sweeps,
                              min_elongation_by_class=min_elongation_by_class)


def calibrate_verdict_multilabel(
    dies: np.ndarray,
    dataset_labels: Sequence[str | None],
    *,
    class_names: Sequence[str],
    source: str,
    min_dies: Sequence[int] = CALIBRATION_MIN_DIES,
    min_share: Sequence[float] = CALIBRATION_MIN_SHARE,
    per_class_sweeps: int = 2,
    min_elongation_by_class: dict[str, float] | None = None,
) -> tuple[VerdictConfig, float]:
    """Per-pattern thresholds with the best multi-label macro-F1 of ``patterns`` (MixedWM38 labels).

    The same search as :func:`calibrate_verdict` (a shared pair from the grid, then one pattern's
    pair at a time, strict improvements only) with :func:`multilabel_scores`' macro-F1 as the
    objective. A pattern's F1 depends only on its own thresholds, so one sweep already reaches the
    best pair per pattern on the grid; a second finds nothing more. Wafers whose label is excluded
    (Near-full, unlabelled) do not count.
    """
    return _coordinate_search(_multilabel_objective(dies, dataset_labels, class_names), class_names=class_names, source=source, min_dies=min_dies,
                              min_share=min_share, per_class_sweeps=per_class_sweeps,
                              min_elongation_by_class=min_elongation_by_class)


def calibrate_verdict_joint(
    single: tuple[np.ndarray, Sequence[str | None]],
    mixed: tuple[np.ndarray, Sequence[str | None]],
    *,
    class_names: Sequence[str],
    source: str,
    min_dies: Sequence[int] = CALIBRATION_MIN_DIES,
    min_share: Sequence[float] = CALIBRATION_MIN_SHARE,
    per_class_sweeps: int = 2,
    min_elongation_by_class: dict[str, float] | None = None,
) -> tuple[VerdictConfig, float]:
    """One set of thresholds for both verdicts: the mean of the single-label macro-F1 of
    ``dominant_pattern`` on ``single`` (WM-811K: dies, labels) and the multi-label macro-F1 of
    ``patterns`` on ``mixed`` (MixedWM38). One scorer serves both columns, so its thresholds are
    fitted to both kinds of wafer at once rather than to one at the other's cost."""
    first = _single_label_objective(*single, class_names)
    second = _multilabel_objective(*mixed, class_names)
    return _coordinate_search(lambda v: 0.5 * (first(v) + second(v)), class_names=class_names, source=source,
                              min_dies=min_dies, min_share=min_share, per_class_sweeps=per_class_sweeps,
                              min_elongation_by_class=min_elongation_by_class)


def _single_label_objective(dies: np.ndarray, dataset_labels: Sequence[str | None],
                            class_names: Sequence[str]) -> Callable[[VerdictConfig], float]:
    """Thresholds -> macro-F1 of ``dominant_pattern`` against one-pattern dataset labels: the same
    figure as :func:`verdict_scores` of :func:`verdicts_from_counts`, in numpy (the search calls it
    hundreds of times)."""
    labels = verdict_labels(class_names)
    mapped = [map_dataset_label(x) for x in dataset_labels]
    keep = [i for i, m in enumerate(mapped) if m is not None]  # as real_eval_report scores them
    unknown = sorted({mapped[i] for i in keep} - set(labels))
    if unknown:
        raise ValueError(f"labels {unknown} are not among {labels}")
    true = np.array([labels.index(mapped[i]) for i in keep], np.int64)  # 0 none, k pattern class k
    kept = np.asarray(dies, dtype=np.int64)[keep]
    patterns = kept[:, 1:]
    share = patterns / np.maximum(kept.sum(axis=1), 1)[:, None]
    k = len(labels)

    def macro_f1(candidate: VerdictConfig) -> float:
        present = _present(patterns, share, class_names=class_names, verdict=candidate)
        # the dominant pattern: most dies among the present ones, ties to the lower class id
        dominant = np.argmax(np.where(present, patterns, -1), axis=1) + 1
        pred = np.where(present.any(axis=1), dominant, 0)
        return _macro_f1(np.bincount(true * k + pred, minlength=k * k).reshape(k, k))
    return macro_f1


def _macro_f1(confusion: np.ndarray) -> float:
    """Mean over labels of F1 = 2 tp / (2 tp + fp + fn), 0 where that is 0 / 0 (as sklearn's
    ``zero_division=0``); rows are true labels, columns verdicts."""
    tp = np.diag(confusion).astype(np.float64)
    denominator = confusion.sum(axis=0) + confusion.sum(axis=1)  # (tp + fp) + (tp + fn)
    return float(np.mean(np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)))


def _multilabel_objective(dies: np.ndarray, dataset_labels: Sequence[str | None],
                          class_names: Sequence[str]) -> Callable[[VerdictConfig], float]:
    """Thresholds -> multi-label macro-F1 of the ``patterns`` presence against mixed dataset labels."""
    keep, truth, _ = _multilabel_truth(dataset_labels, list(class_names[1:]))
    kept = np.asarray(dies, dtype=np.int64)[keep]
    patterns = kept[:, 1:]
    share = patterns / np.maximum(kept.sum(axis=1), 1)[:, None]

    def macro_f1(candidate: VerdictConfig) -> float:
        pred = _present(patterns, share, class_names=class_names, verdict=candidate)
        return float(_multilabel_counts(truth, pred)["f1"].mean())
    return macro_f1


def _coordinate_search(
    objective: Callable[[VerdictConfig], float],
    *,
    class_names: Sequence[str],
    source: str,
    min_dies: Sequence[int],
    min_share: Sequence[float],
    per_class_sweeps: int,
    min_elongation_by_class: dict[str, float] | None,
) -> tuple[VerdictConfig, float]:
    """The best shared (min_dies, min_share) grid pair, then per-pattern retuning while it helps."""
    grid = [(md, ms) for md in sorted(min_dies) for ms in sorted(min_share)]
    if not grid:
        raise ValueError("calibrate_verdict needs at least one min_dies and one min_share value")
    best_f1, best = -1.0, None
    for md, ms in grid:
        candidate = VerdictConfig(min_dies=md, min_share=ms, calibrated_on=source,
                                  min_elongation_by_class=dict(min_elongation_by_class or {}))
        if (f1 := objective(candidate)) > best_f1:
            best_f1, best = f1, candidate
    for _ in range(per_class_sweeps):
        improved = False
        for name in class_names[1:]:
            for md, ms in grid:
                candidate = best.model_copy(update={"min_dies_by_class": {**best.min_dies_by_class, name: md},
                                                    "min_share_by_class": {**best.min_share_by_class, name: ms}})
                if (f1 := objective(candidate)) > best_f1:
                    best_f1, best, improved = f1, candidate, True
        if not improved:
            break
    return best, best_f1


# -- scores ---------------------------------------------------------------------------------------
def verdict_scores(true_patterns: Sequence[str], pred_patterns: Sequence[str], *, labels: Sequence[str]) -> dict:
    """Accuracy, macro-F1, per-label precision/recall/F1 and the confusion matrix (computed by sklearn).

    ``confusion[i][j]`` counts wafers whose true label is ``labels[i]`` and verdict ``labels[j]``.
    A ratio with a zero denominator (no wafer of a label, or none predicted) is 0.0, and macro-F1
    averages over all ``labels``, so a label never seen nor predicted pulls macro-F1 down: pass
    only the labels you mean to score.
    """
    labels = list(labels)
    if len(set(labels)) != len(labels) or not labels:
        raise ValueError(f"labels must be distinct and non-empty, got {labels}")
    if len(true_patterns) != len(pred_patterns):
        raise ValueError(f"{len(true_patterns)} true labels but {len(pred_patterns)} predictions")
    index = {name: i for i, name in enumerate(labels)}
    unknown = sorted({x for x in (*true_patterns, *pred_patterns) if x not in index})
    if unknown:
        raise ValueError(f"labels {unknown} are not among {labels}")
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support  # lazy: a heavy import

    k = len(labels)
    if len(true_patterns):
        cm = confusion_matrix(true_patterns, pred_patterns, labels=labels)
        precision, recall, f1, support = precision_recall_fscore_support(true_patterns, pred_patterns, labels=labels,
                                                                         zero_division=0.0)
    else:  # sklearn refuses empty input; no wafer scores zero everywhere
        cm, support = np.zeros((k, k), np.int64), np.zeros(k, np.int64)
        precision = recall = f1 = np.zeros(k)
    predicted = cm.sum(axis=0)
    n = int(cm.sum())
    return {
        "n": n,
        "accuracy": float(np.trace(cm) / n) if n else 0.0,
        "macro_f1": float(f1.mean()),
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "labels": labels,
        "confusion": cm.tolist(),
        "per_label": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(support[i]), "predicted": int(predicted[i])}
            for i, name in enumerate(labels)
        },
    }


# -- real-data report -------------------------------------------------------------------------------
@dataclass(frozen=True)
class RealEvalReport:
    """Verdicts scored against dataset labels, as numbers, tables and Markdown."""

    scores: dict  # verdict_scores(...) on the wafers kept
    table: pd.DataFrame  # per label + accuracy + macro avg rows (classification-report layout), CSV-ready
    confusion: pd.DataFrame  # rows: true label, columns: verdict
    by_dataset_label: pd.DataFrame  # rows: original dataset label, columns: verdict counts + hit rate
    excluded: dict[str, int]  # original label (or UNLABELLED) -> wafers left out
    markdown: str

    def metrics(self, prefix: str = "real_") -> dict[str, float]:
        """Flat metric names for MLflow: accuracy, macro_f1, recall/precision/f1 per label."""
        out = {f"{prefix}accuracy": self.scores["accuracy"], f"{prefix}macro_f1": self.scores["macro_f1"],
               f"{prefix}n_wafers": float(self.scores["n"])}
        for name, s in self.scores["per_label"].items():
            key = name.replace(" ", "_")
            for what in ("recall", "precision", "f1"):
                out[f"{prefix}{what}_{key}"] = s[what]
        return out


def _markdown_table(df: pd.DataFrame, *, index_name: str) -> str:
    """``df`` as Markdown: floats to 3 decimals, missing values blank."""
    shown = df.astype(object).where(df.notna(), None).rename_axis(index=index_name, columns=None)
    return shown.to_markdown(floatfmt=".3f", missingval="")


def real_eval_report(
    dataset_labels: Sequence[str | None],
    pred_patterns: Sequence[str],
    *,
    labels: Sequence[str],
    title: str = "Wafer verdicts on real maps",
) -> RealEvalReport:
    """Score verdicts (``dominant_pattern`` per wafer) against the datasets' own wafer labels.

    ``dataset_labels`` are raw labels ('Edge-Ring', 'None', 'Center+Scratch', …), mapped with
    ``map_dataset_label``; wafers that map to None (Near-full, unlabelled, multi-pattern mixes) are
    left out and counted in ``excluded``. ``labels`` is the label order, normally
    ``verdict_labels(cfg.class_names)``.
    """
    if len(dataset_labels) != len(pred_patterns):
        raise ValueError(f"{len(dataset_labels)} dataset labels but {len(pred_patterns)} predictions")
    labels = list(labels)
    missing = sorted({v for v in LABEL_MAP.values() if v is not None} - set(labels))
    if missing:
        raise ValueError(f"LABEL_MAP targets {missing}, which are not among the verdict labels {labels}; "
                         "the class names in the config must match the mapping")
    mapped = [map_dataset_label(x) for x in dataset_labels]
    keep = [i for i, m in enumerate(mapped) if m is not None]
    excluded = Counter(UNLABELLED if not dataset_labels[i] else str(dataset_labels[i])
                       for i, m in enumerate(mapped) if m is None)
    true = [mapped[i] for i in keep]
    pred = [pred_patterns[i] for i in keep]
    scores = verdict_scores(true, pred, labels=labels)

    per = scores["per_label"]
    table = pd.DataFrame(
        [{"label": n, "precision": s["precision"], "recall": s["recall"], "f1": s["f1"], "support": s["support"],
          "predicted": s["predicted"]} for n, s in per.items()]
        + [{"label": "accuracy", "precision": np.nan, "recall": np.nan, "f1": scores["accuracy"],
            "support": scores["n"], "predicted": scores["n"]},
           {"label": "macro avg", "precision": scores["macro_precision"], "recall": scores["macro_recall"],
            "f1": scores["macro_f1"], "support": scores["n"], "predicted": scores["n"]}]
    )
    confusion = pd.DataFrame(scores["confusion"], index=pd.Index(labels, name="true"),
                             columns=pd.Index(labels, name="verdict"))

    raw_kept = [str(dataset_labels[i]) for i in keep]
    by_raw = pd.crosstab(pd.Series(raw_kept, name="dataset label"), pd.Series(pred, name="verdict"))
    by_raw = by_raw.reindex(columns=labels, fill_value=0)
    hits = pd.Series([t == p for t, p in zip(true, pred)], dtype=float)
    by_raw["n"] = by_raw[labels].sum(axis=1)
    by_raw["expected"] = [map_dataset_label(x) for x in by_raw.index]
    by_raw["hit_rate"] = hits.groupby(pd.Series(raw_kept)).mean().reindex(by_raw.index).to_numpy()
    by_raw = by_raw.sort_values("n", ascending=False)

    excluded_text = ", ".join(f"{k} {v}" for k, v in sorted(excluded.items())) or "none"
    markdown = "\n\n".join([
        f"### {title}",
        f"{scores['n']} wafers scored: accuracy **{scores['accuracy']:.3f}**, macro-F1 "
        f"**{scores['macro_f1']:.3f}** over {', '.join(labels)}. Left out: {excluded_text}.",
        _markdown_table(table.set_index("label"), index_name="label"),
        "Confusion (rows: mapped dataset label, columns: verdict):",
        _markdown_table(confusion, index_name="true \\ verdict"),
        "By original dataset label:",
        _markdown_table(by_raw, index_name="dataset label"),
    ]) + "\n"
    return RealEvalReport(scores, table, confusion, by_raw, dict(excluded), markdown)


def miss_examples(
    true_patterns: Sequence[str | None],
    pred_patterns: Sequence[str],
    *,
    max_pairs: int = 6,
    per_pair: int = 4,
    seed: int = 0,
) -> list[tuple[str, str, list[int]]]:
    """The most frequent (true, verdict) confusions with a few sample wafer indices each, for
    pictures of typical misses. None true labels (excluded wafers) are skipped."""
    pairs: dict[tuple[str, str], list[int]] = {}
    for i, (t, p) in enumerate(zip(true_patterns, pred_patterns)):
        if t is not None and t != p:
            pairs.setdefault((t, p), []).append(i)
    rng = np.random.default_rng(seed)
    ranked = sorted(pairs.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:max_pairs]
    return [(t, p, sorted(rng.choice(idx, size=min(per_pair, len(idx)), replace=False).tolist()))
            for (t, p), idx in ranked]


# -- multi-label and die-level scores (issue #13) ----------------------------------------------------
def _multilabel_truth(dataset_labels: Sequence[str | None],
                      pattern_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """(kept row indices, (n_kept, n_patterns) bool truth, excluded label -> wafers) of dataset labels.

    'None'/'Random' wafers are kept with no pattern; Near-full and unlabelled wafers are excluded.
    """
    index = {name: k for k, name in enumerate(pattern_names)}
    keep, rows, excluded = [], [], Counter()
    for i, label in enumerate(dataset_labels):
        patterns = dataset_label_patterns(label)
        if patterns is None:
            excluded[UNLABELLED if not label else str(label)] += 1
            continue
        row = np.zeros(len(pattern_names), bool)
        for name in patterns - {NONE}:
            if name not in index:
                raise ValueError(f"dataset label {label!r} means pattern {name!r}, which is not among the "
                                 f"pattern classes {list(pattern_names)}")
            row[index[name]] = True
        keep.append(i)
        rows.append(row)
    truth = np.array(rows, bool).reshape(len(rows), len(pattern_names))
    return np.array(keep, np.int64), truth, dict(excluded)


def _multilabel_counts(truth: np.ndarray, pred: np.ndarray) -> dict[str, np.ndarray]:
    """Per-pattern tp/fp/fn, precision, recall and F1 of two (N, P) presence matrices (0/0 -> 0.0)."""
    tp = (truth & pred).sum(axis=0)
    fp = (~truth & pred).sum(axis=0)
    fn = (truth & ~pred).sum(axis=0)
    precision = np.divide(tp, tp + fp, out=np.zeros(tp.shape), where=tp + fp > 0)
    recall = np.divide(tp, tp + fn, out=np.zeros(tp.shape), where=tp + fn > 0)
    f1 = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros(tp.shape), where=2 * tp + fp + fn > 0)
    return {"tp": tp, "fp": fp, "fn": fn, "precision": precision, "recall": recall, "f1": f1}


def multilabel_scores(dataset_labels: Sequence[str | None], pred_patterns: Sequence[str], *,
                      pattern_names: Sequence[str]) -> dict:
    """Score ``patterns`` strings against multi-pattern dataset labels ('Center+Edge-Loc+Scratch').

    Per pattern: precision, recall and F1 of "the pattern is present" over the wafers (support:
    wafers whose label has it, predicted: wafers whose verdict has it); ``macro_f1`` averages the
    F1 of all ``pattern_names``; ``exact_match`` is the share of wafers whose set of patterns is
    exactly the label's (a 'None' wafer needs 'none'). Labels are mapped by
    :func:`dataset_label_patterns` (Donut and Edge-Ring are both ring, so 'Donut+Edge-Ring' is
    just ring); Near-full and unlabelled wafers are left out and counted in ``excluded``.
    """
    if len(dataset_labels) != len(pred_patterns):
        raise ValueError(f"{len(dataset_labels)} dataset labels but {len(pred_patterns)} predictions")
    pattern_names = list(pattern_names)
    keep, truth, excluded = _multilabel_truth(dataset_labels, pattern_names)
    pred = np.zeros_like(truth)
    index = {name: k for k, name in enumerate(pattern_names)}
    for row, i in enumerate(keep):
        for name in parse_patterns(pred_patterns[i]):
            if name not in index:
                raise ValueError(f"verdict {pred_patterns[i]!r} names {name!r}, not among {pattern_names}")
            pred[row, index[name]] = True
    c = _multilabel_counts(truth, pred)
    n = len(keep)
    return {
        "n": n,
        "exact_match": float((truth == pred).all(axis=1).mean()) if n else 0.0,
        "macro_f1": float(c["f1"].mean()),
        "macro_precision": float(c["precision"].mean()),
        "macro_recall": float(c["recall"].mean()),
        "per_pattern": {name: {"precision": float(c["precision"][k]), "recall": float(c["recall"][k]),
                               "f1": float(c["f1"][k]), "support": int(truth[:, k].sum()),
                               "predicted": int(pred[:, k].sum())}
                        for k, name in enumerate(pattern_names)},
        "excluded": excluded,
    }


def dataset_patterns_string(label: str | None, pattern_names: Sequence[str]) -> str | None:
    """A dataset label as a ``patterns`` string ('Scratch+Center' -> 'scratch+circle' in class-id
    order; 'None', 'Random' -> 'none'), None when excluded: compare it with the verdict's
    ``patterns``, e.g. ``miss_examples(truth, verdicts.patterns)`` for pictures of typical misses."""
    patterns = dataset_label_patterns(label)
    if patterns is None:
        return None
    unknown = sorted(patterns - {NONE} - set(pattern_names))
    if unknown:
        raise ValueError(f"dataset label {label!r} means {unknown}, not among the pattern classes "
                         f"{list(pattern_names)}")
    return PATTERN_SEPARATOR.join(n for n in pattern_names if n in patterns) or NONE


def _pooled_share(part: np.ndarray, whole: np.ndarray) -> float:
    """sum(part) / sum(whole), NaN when there is nothing to share (no die to judge)."""
    total = int(np.sum(whole))
    return float(np.sum(part) / total) if total else float("nan")


def die_purity(dies: np.ndarray, dataset_labels: Sequence[str | None], *, class_names: Sequence[str]) -> dict:
    """Real die purity: of the fail dies given a pattern on wafers labelled with one pattern, the share
    that carry the wafer's own pattern (pooled over the wafers), overall and by dataset label.

    ``dies`` is the (N, n_classes) fail-die count matrix after the shape rules. Wafers labelled
    None/Random, Near-full, unlabelled or with several patterns do not count. ``purity`` is NaN when
    no counted wafer has a pattern die. A WM-811K measure: its labels name one pattern per wafer.
    """
    dies = _checked_counts(dies, dataset_labels, class_names)
    class_id = {name: k for k, name in enumerate(class_names)}
    own, given, by_raw = [], [], {}
    for i, label in enumerate(dataset_labels):
        mapped = map_dataset_label(label)
        if mapped is None or mapped == NONE:
            continue
        if mapped not in class_id:
            raise ValueError(f"dataset label {label!r} means {mapped!r}, not among the classes {list(class_names)}")
        pair = (int(dies[i, class_id[mapped]]), int(dies[i, 1:].sum()))
        own.append(pair[0])
        given.append(pair[1])
        by_raw.setdefault(str(label), []).append(pair)
    by_label = {}
    for label, pairs in sorted(by_raw.items()):
        o, g = np.array(pairs).reshape(-1, 2).T
        by_label[label] = {"purity": _pooled_share(o, g), "pattern_dies": int(g.sum()), "wafers": len(pairs)}
    return {"purity": _pooled_share(np.array(own), np.array(given)), "pattern_dies": int(np.sum(given)),
            "wafers": len(own), "by_label": by_label}


def false_alarm_share(dies: np.ndarray, dataset_labels: Sequence[str | None], *,
                      class_names: Sequence[str]) -> dict:
    """Of the fail dies on wafers labelled without pattern (WM-811K None, Random), the share given a
    pattern (pooled), overall and by dataset label; also the share of those wafers with any pattern die.

    NaN when those wafers have no fail die at all.
    """
    dies = _checked_counts(dies, dataset_labels, class_names)
    rows = [i for i, label in enumerate(dataset_labels) if dataset_label_patterns(label) == {NONE}]
    by_label = {}
    for label in sorted({str(dataset_labels[i]) for i in rows}):
        sel = [i for i in rows if str(dataset_labels[i]) == label]
        by_label[label] = {"share": _pooled_share(dies[sel, 1:], dies[sel]), "fail_dies": int(dies[sel].sum()),
                           "wafers": len(sel)}
    sel = np.array(rows, np.int64)
    flagged = (dies[sel, 1:].sum(axis=1) > 0).mean() if len(sel) else float("nan")
    return {"share": _pooled_share(dies[sel, 1:], dies[sel]), "fail_dies": int(dies[sel].sum()),
            "wafers": len(sel), "wafers_with_pattern_dies": float(flagged), "by_label": by_label}


def _checked_counts(dies: np.ndarray, dataset_labels: Sequence[str | None], class_names: Sequence[str]) -> np.ndarray:
    dies = np.asarray(dies, dtype=np.int64)
    if dies.ndim != 2 or dies.shape != (len(dataset_labels), len(class_names)):
        raise ValueError(f"dies has shape {dies.shape}, expected ({len(dataset_labels)}, {len(class_names)}): "
                         "one row per dataset label, one column per class")
    return dies


def multilabel_metrics(scores: dict, prefix: str = "mixed_") -> dict[str, float]:
    """Flat metric names of :func:`multilabel_scores` for MLflow: exact_match, macro_f1, f1 per pattern."""
    out = {f"{prefix}exact_match": scores["exact_match"], f"{prefix}macro_f1": scores["macro_f1"],
           f"{prefix}n_wafers": float(scores["n"])}
    for name, s in scores["per_pattern"].items():
        key = name.replace(" ", "_")
        for what in ("precision", "recall", "f1"):
            out[f"{prefix}{what}_{key}"] = s[what]
    return out


def die_metrics(purity: dict, false_alarm: dict, prefix: str = "real_") -> dict[str, float]:
    """Flat metric names of :func:`die_purity` and :func:`false_alarm_share` for MLflow."""
    out = {f"{prefix}die_purity": purity["purity"], f"{prefix}false_alarm_share": false_alarm["share"]}
    for label, s in purity["by_label"].items():
        key = re.sub(r"\W+", "_", label.lower())  # 'Edge-Ring' -> 'edge_ring'
        out[f"{prefix}die_purity_{key}"] = s["purity"]
    return out
