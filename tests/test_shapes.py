"""Shape rules: group elongation by hand, and the scratch-is-a-line rule on small maps."""

from __future__ import annotations

import numpy as np
import pytest

from fcn_core.shapes import LineRescue, apply_min_elongation, group_elongation

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


def _line_in_a_band(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 30 x 30 all-fail map painted scratch on a diagonal line of 18 dies and on a third of the dies
    of a band 9 dies wide either side of it (random fails the network painted with it): the line and most
    of the band are one 8-connected group, far from elongated enough. (pred, die, line mask)."""
    rng = np.random.default_rng(seed)
    die = np.full((30, 30), 2, np.uint8)
    yy, xx = np.mgrid[:30, :30]
    line = (yy == xx) & (yy >= 6) & (yy < 24)
    band = (np.abs(yy - xx) <= 9) & (yy >= 6) & (yy < 24) & (rng.random((30, 30)) < 0.35)
    pred = np.where(line | band, S, 0).astype(np.uint8)
    return pred, die, line


def test_a_line_through_a_band_is_rescued_and_only_dies_along_its_axis_are_kept() -> None:
    pred, die, line = _line_in_a_band()
    _, count, elongation = group_elongation(pred == S)
    assert elongation[count.argmax()] < 4.0  # the band (the line in it) is one compact group
    assert not (apply_min_elongation(pred, die, {S: 4.0})[line] == S).any()  # dropped, line included
    rescue = LineRescue()
    out = apply_min_elongation(pred, die, {S: 4.0}, rescue=rescue)
    kept = out == S
    yy, xx = np.nonzero(kept)
    assert kept.sum() >= rescue.min_line_dies and (kept & line).sum() == line.sum()  # the whole line
    assert (np.abs(yy - xx) <= 3).all()  # a strip along the group's (fitted) axis: no band die far from the line
    _, _, kept_elongation = group_elongation(kept)
    assert (kept_elongation >= 4.0).all()
    assert np.array_equal(apply_min_elongation(out, die, {S: 4.0}, rescue=rescue), out)  # idempotent
    # a group smaller than min_group_dies, or a line shorter than min_line_dies, is not rescued
    plain = apply_min_elongation(pred, die, {S: 4.0})
    assert np.array_equal(apply_min_elongation(pred, die, {S: 4.0}, rescue=LineRescue(min_group_dies=1000)), plain)
    assert np.array_equal(apply_min_elongation(pred, die, {S: 4.0}, rescue=LineRescue(min_line_dies=1000)), plain)


def test_a_compact_clump_keeps_no_line() -> None:
    die = np.full((12, 12), 2, np.uint8)
    pred = np.zeros((12, 12), np.uint8)
    pred[2:9, 2:9] = S  # a 7 x 7 clump: its axis strip is 3 wide and 7 long, not a line
    assert not (apply_min_elongation(pred, die, {S: 4.0}, rescue=LineRescue()) == S).any()
    pred[10, 0:12] = 3  # another class is never touched
    assert (apply_min_elongation(pred, die, {S: 4.0}, rescue=LineRescue())[10] == 3).all()
