"""Shape rules: group elongation by hand, and the scratch-is-a-line rule on small maps."""

from __future__ import annotations

import numpy as np
import pytest

from fcn_core.shapes import apply_min_elongation, group_elongation

S = 2  # scratch in the default classes


def test_elongation_of_simple_groups() -> None:
    mask = np.zeros((9, 12), bool)
    mask[0, 0] = True                      # one die: 1
    mask[0, 3:7] = True                    # four in a row: exactly 4
    mask[3:5, 0:2] = True                  # a 2 x 2 block: 1
    for i in range(4):                     # four on a diagonal: longer than four in a row
        mask[5 + i, 8 + i] = True
    groups, sizes, elongation = group_elongation(mask)
    by_first_die = {(int(y), int(x)): g for g, (y, x) in
                    ((g, np.argwhere(groups == g)[0]) for g in range(1, len(sizes) + 1))}
    one, row, block, diagonal = (by_first_die[p] - 1 for p in [(0, 0), (0, 3), (3, 0), (5, 8)])
    assert sizes[[one, row, block, diagonal]].tolist() == [1, 4, 4, 4]
    assert elongation[one] == pytest.approx(1.0) and elongation[block] == pytest.approx(1.0)
    assert elongation[row] == pytest.approx(4.0)
    assert elongation[diagonal] == pytest.approx(np.sqrt(31))  # variances 2.5 + 1/12 and 1/12


def test_diagonal_neighbours_join_one_group() -> None:
    mask = np.eye(5, dtype=bool)
    groups, sizes, _ = group_elongation(mask)
    assert sizes.tolist() == [5] and set(np.unique(groups[mask])) == {1}
    with pytest.raises(ValueError, match="2-D"):
        group_elongation(np.zeros((2, 2, 2), bool))


def test_compact_scratch_groups_go_to_background_lines_stay() -> None:
    die = np.full((10, 10), 2, np.uint8)
    die[9, :] = 1                           # a pass row: never judged, never relabelled
    pred = np.zeros((10, 10), np.uint8)
    pred[1, 1:8] = S                        # a line of 7: stays
    pred[4:7, 4:7] = S                      # a 3 x 3 clump: goes
    pred[8, 0:3] = S                        # three in a row (elongation 3): goes at 4
    pred[8, 8] = 3                          # another class: untouched
    pred[9, 0:2] = S                        # on pass dies: not fail dies, left alone
    out = apply_min_elongation(pred, die, {S: 4.0})
    assert (out[1, 1:8] == S).all() and (out[4:7, 4:7] == 0).all() and (out[8, 0:3] == 0).all()
    assert out[8, 8] == 3 and (out[9, 0:2] == S).all()
    assert (pred[4:7, 4:7] == S).all()     # a copy unless inplace
    again = apply_min_elongation(out, die, {S: 4.0})
    assert np.array_equal(again, out)       # idempotent: whole groups go
    assert np.array_equal(apply_min_elongation(pred, die, {S: 3.0})[8, 0:3], [S, S, S])
    assert np.array_equal(apply_min_elongation(pred, die, {S: 1.0}), pred)  # 1 = no rule
    view = pred.copy()
    apply_min_elongation(view, die, {S: 4.0}, inplace=True)
    assert np.array_equal(view, out)
    with pytest.raises(ValueError, match="differ in shape"):
        apply_min_elongation(pred, die[:5], {S: 4.0})
