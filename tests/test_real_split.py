"""fcn_core.real_split: the held-out real tables cut by a fixed hash of each map."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from fcn_core.real_split import (
    CALIBRATION_FRACTION,
    HELD_OUT_TABLES,
    SPLIT_SALT,
    calibration_mask,
    check_trainable,
    map_unit_hashes,
    split_held_out,
)
from fcn_core.settings import settings
from fcn_core.synth import generate_wafers
from fcn_core.table import make_table, read_parquet


# map_unit_hashes of FIXED_MAPS, recorded when the split was fixed
RECORDED_HASHES = [0.6078, 0.125159, 0.167179]


def fixed_maps() -> pa.Table:
    """Three hand-made maps whose bytes never change."""
    maps = [np.array([[0, 1, 0], [1, 2, 1], [0, 1, 0]], np.uint8), np.full((2, 4), 2, np.uint8),
            np.array([[1, 2], [2, 1]], np.uint8)]
    return make_table(wafer_ids=["a", "b", "c"], die_maps=maps)


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return generate_wafers(400, seed=5)


def test_parts_are_disjoint_cover_the_table_and_keep_row_order(table):
    parts = split_held_out(table)
    ids = table.column("wafer_id").to_pylist()
    cal, score = parts.calibration.column("wafer_id").to_pylist(), parts.scoring.column("wafer_id").to_pylist()
    assert not set(cal) & set(score) and sorted(cal + score) == sorted(ids)
    mask = calibration_mask(table)
    assert cal == [i for i, m in zip(ids, mask) if m] and score == [i for i, m in zip(ids, mask) if not m]
    assert 0.4 < len(cal) / len(ids) < 0.6  # about CALIBRATION_FRACTION = 0.5 of 400 maps


def test_the_split_depends_on_the_map_only(table):
    mask = calibration_mask(table)
    order = np.random.default_rng(0).permutation(table.num_rows)
    shuffled = table.take(pa.array(order))
    renamed = shuffled.set_column(0, "wafer_id", pa.array([f"other-{i}" for i in range(table.num_rows)]))
    np.testing.assert_array_equal(calibration_mask(renamed), mask[order])  # order and ids do not matter
    # the same map twice (identical maps occur in real data) lands on one side
    twice = pa.concat_tables([table.slice(0, 50), table.slice(0, 50)])
    m = calibration_mask(twice)
    np.testing.assert_array_equal(m[:50], m[50:])


def test_the_split_is_fixed_across_runs_and_releases(table):
    # recorded once: a change of salt, fraction or hash would silently reshuffle every real figure
    assert SPLIT_SALT == "wafer-fcn-real-split-v1" and CALIBRATION_FRACTION == 0.5
    u = map_unit_hashes(fixed_maps())
    assert np.round(u, 6).tolist() == RECORDED_HASHES
    other = map_unit_hashes(fixed_maps(), salt="another salt")
    assert not np.allclose(u, other)


def test_bad_input_is_refused_with_one_line(table):
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        calibration_mask(table, fraction=1.0)
    with pytest.raises(ValueError, match="no die_map column"):
        calibration_mask(table.drop_columns(["die_map"]))


def test_held_out_tables_are_never_trainable(tmp_path):
    for name in HELD_OUT_TABLES:
        with pytest.raises(ValueError, match="never trained on"):
            check_trainable(tmp_path / name)
    assert check_trainable(tmp_path / "wm811k-train.parquet") == tmp_path / "wm811k-train.parquet"


@pytest.mark.parametrize("name", HELD_OUT_TABLES)
def test_real_held_out_tables_split_about_in_half(name):
    path = settings().real_maps(name)
    if path is None or not path.exists():
        pytest.skip(f"real {name} not present")
    real = read_parquet(path)
    parts = split_held_out(real)
    assert parts.calibration.num_rows + parts.scoring.num_rows == real.num_rows
    assert abs(parts.calibration.num_rows / real.num_rows - 0.5) < 0.02
    # every label is in both parts in about its share (no label falls on one side)
    for part in (parts.calibration, parts.scoring):
        labels = set(part.column("wafer_label").to_pylist())
        assert labels == set(real.column("wafer_label").to_pylist())
