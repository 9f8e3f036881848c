"""Shape rules on predicted pattern maps: a scratch is a line.

On real WM-811K maps the network also paints compact clumps of random fail dies as scratch (small
maps with many random fails look like that to a die-level model). A physical scratch is long and
thin, so ``apply_min_elongation`` keeps a pattern's dies only in 8-connected groups that are
elongated enough and gives the rest back to background. Measured on the held-out real maps with
the demo's FCN-1s and calibrated thresholds (README): scratch F1 0.32 -> 0.66, macro-F1 0.757 -> 0.824.

Elongation of a group = sqrt(l1 / l2), the eigenvalues of the covariance of its dies, each die
taken as a unit square (its own extent adds 1/12 of variance along every axis, so no group is
infinitely thin): 1 for one die or a square block, 2 for two dies side by side, 3 for three in a
row, 4 for four in a row, and more for a diagonal line of the same count.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from fcn_core.table import FAIL

EIGHT_NEIGHBOURS = np.ones((3, 3), dtype=bool)
DIE_VARIANCE = 1.0 / 12.0  # variance of a unit square along any axis
_TOLERANCE = 1e-9  # four dies in a row are exactly 4.0 in exact arithmetic


def group_elongation(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """8-connected groups of a boolean map: (group id per position, 0 = none; dies per group; elongation per group).

    The arrays per group are indexed by group id - 1.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D map, got shape {mask.shape}")
    groups, n = ndimage.label(mask, structure=EIGHT_NEIGHBOURS)
    if n == 0:
        return groups, np.zeros(0, dtype=np.int64), np.zeros(0)
    ys, xs = np.nonzero(groups)
    ids = groups[ys, xs]
    count = np.bincount(ids, minlength=n + 1)[1:]

    def mean(values: np.ndarray) -> np.ndarray:
        return np.bincount(ids, weights=values.astype(np.float64), minlength=n + 1)[1:] / count

    my, mx = mean(ys), mean(xs)
    vyy = mean(ys * ys) - my * my + DIE_VARIANCE
    vxx = mean(xs * xs) - mx * mx + DIE_VARIANCE
    vxy = mean(ys * xs) - my * mx
    half_trace = (vyy + vxx) / 2
    spread = np.sqrt(np.maximum(half_trace ** 2 - (vyy * vxx - vxy ** 2), 0.0))
    l1, l2 = half_trace + spread, np.maximum(half_trace - spread, 1e-12)
    return groups, count.astype(np.int64), np.sqrt(l1 / l2)


def long_groups(mask: np.ndarray, *, min_dies: int, min_elongation: float) -> np.ndarray:
    """The positions of ``mask`` in 8-connected groups of at least ``min_dies`` dies and ``min_elongation``."""
    groups, count, elongation = group_elongation(mask)
    keep = np.zeros(count.size + 1, dtype=bool)
    keep[1:] = (count >= min_dies) & (elongation >= min_elongation - _TOLERANCE)
    return keep[groups]


@dataclass(frozen=True)
class LineRescue:
    """Keep the line through a group too compact for its class's elongation rule.

    On noisy maps the network paints a scratch's random-fail neighbours scratch too: the group is a
    band, not a line, and the elongation rule would drop it, line included. For a dropped group of
    at least ``min_group_dies`` dies, the dies within ``max_axis_distance`` of its principal axis
    are kept when, judged alone, one of their 8-connected pieces (3+ dies) reaches
    ``min_line_elongation`` and they number ``min_line_dies``; of those, the pieces (3+ dies) that
    pass the class's own rule keep the class. A square clump's strip is not elongated: it stays dropped.
    """

    min_group_dies: int = 12
    max_axis_distance: float = 1.5
    min_line_dies: int = 8
    min_line_elongation: float = 6.0

    def line_of(self, ys: np.ndarray, xs: np.ndarray, shape: tuple[int, int], min_elongation: float) -> np.ndarray:
        """Bool map (``shape``) of the dies of one group (``ys``, ``xs``) kept as a line; all False if none."""
        kept = np.zeros(shape, dtype=bool)
        if ys.size < self.min_group_dies:
            return kept
        dy, dx = ys - ys.mean(), xs - xs.mean()
        _, vectors = np.linalg.eigh(np.cov(np.stack([dy, dx])))
        ay, ax = vectors[:, 1]  # the principal axis (largest eigenvalue)
        near = np.abs(dy * ax - dx * ay) <= self.max_axis_distance
        if near.sum() < self.min_line_dies:
            return kept
        kept[ys[near], xs[near]] = True
        if not long_groups(kept, min_dies=3, min_elongation=self.min_line_elongation).any():
            return np.zeros(shape, dtype=bool)
        return long_groups(kept, min_dies=3, min_elongation=min_elongation)


def apply_min_elongation(pred: np.ndarray, die: np.ndarray, rules: Mapping[int, float], *,
                         inplace: bool = False, rescue: LineRescue | None = None) -> np.ndarray:
    """Relabel as background (0) the fail dies of class ``c`` in groups less elongated than ``rules[c]``.

    ``pred`` holds class ids, ``die`` the die states; only fail dies are grouped and judged (pass
    dies are background anyway). ``rescue``: a dropped group keeps its :meth:`LineRescue.line_of`.
    Applying the rule twice changes nothing more: whole groups go, and a kept line passes the rule.
    """
    if pred.shape != die.shape:
        raise ValueError(f"prediction {pred.shape} and die map {die.shape} differ in shape")
    out = pred if inplace else pred.copy()
    fail = die == FAIL
    for class_id, min_elongation in rules.items():
        mask = fail & (out == class_id)
        if min_elongation <= 1.0 or not mask.any():
            continue
        groups, count, elongation = group_elongation(mask)
        too_short = np.flatnonzero(elongation < min_elongation - _TOLERANCE) + 1
        if not too_short.size:
            continue
        out[np.isin(groups, too_short)] = 0
        if rescue is not None:
            for group in too_short[count[too_short - 1] >= rescue.min_group_dies]:  # the others hold no line
                ys, xs = np.nonzero(groups == group)
                out[rescue.line_of(ys, xs, out.shape, min_elongation)] = class_id
    return out
