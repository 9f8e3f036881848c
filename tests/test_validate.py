"""One test per contract rule, plus the guarantees around them (unchanged rows, extras, errors)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fcn_core.table import WAFER_SCHEMA, WaferTableError, make_table
from fcn_core.validate import REASONS, validate_table

N_CLASSES = 5


def _wafer(h: int, w: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A round-ish die map with some fails, and a label map that labels some fail dies."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    on = ((yy - (h - 1) / 2) / (h / 2)) ** 2 + ((xx - (w - 1) / 2) / (w / 2)) ** 2 <= 1.0
    die = np.where(on, 1, 0).astype(np.uint8)
    die[on & (rng.random((h, w)) < 0.3)] = 2
    label = np.where(die == 2, rng.integers(0, N_CLASSES, (h, w)), 0).astype(np.uint8)
    return die, label


def good_table(n: int = 6, *, start: int = 0) -> pa.Table:
    sizes = [(5, 7), (1, 1), (8, 8), (3, 11), (12, 9), (4, 4), (6, 5), (9, 2)]
    maps = [_wafer(*sizes[i % len(sizes)], seed=start + i) for i in range(n)]
    return make_table(
        wafer_ids=[f"W{start + i:04d}" for i in range(n)],
        die_maps=[d for d, _ in maps],
        label_maps=[lab if i % 3 else None for i, (_, lab) in enumerate(maps)],
        lot_ids=[f"L{(start + i) // 2}" if i % 4 else None for i in range(n)],
        captured_at=[datetime(2024, 5, 1 + i % 3, 12, tzinfo=timezone.utc) if i % 2 else None for i in range(n)],
        wafer_labels=["none" if i % 2 else None for i in range(n)],
    )


def with_bad_row(good: pa.Table, **changes) -> pa.Table:
    """The good table plus one row: a copy of row 0 (a 5 x 7 wafer) renamed 'BAD', then ``changes``."""
    row = good.slice(0, 1).to_pylist()[0]
    row["wafer_id"] = "BAD"
    row.update(changes)
    loose = pa.schema([pa.field(f.name, f.type) for f in WAFER_SCHEMA])  # allow nulls to get in
    bad = pa.Table.from_pylist([row], schema=loose)
    return pa.concat_tables([good.cast(loose), bad])


def assert_only_bad_quarantined(table: pa.Table, good: pa.Table, reason: str, *, known=None) -> None:
    result = validate_table(table, n_classes=N_CLASSES, known_ids=known)
    assert result.valid.schema.equals(WAFER_SCHEMA)
    assert result.valid.equals(good), "good rows must pass through unchanged"
    assert result.quarantine.num_rows == 1
    assert result.quarantine.column("reason").to_pylist() == [reason]
    assert result.counts == {reason: 1}
    # The bad row is kept as it came (all original columns, original bytes).
    original = table.slice(table.num_rows - 1, 1).to_pylist()[0]
    kept = result.quarantine.drop_columns(["reason"]).to_pylist()[0]
    assert kept == original


def test_good_table_passes_unchanged():
    good = good_table(8)
    result = validate_table(good, n_classes=N_CLASSES)
    assert result.valid.equals(good)
    assert result.quarantine.num_rows == 0 and "reason" in result.quarantine.column_names
    assert result.counts == {}
    # byte-for-byte: the maps are the same buffers' contents
    assert result.valid.column("die_map").to_pylist() == good.column("die_map").to_pylist()


def _bad_label_row(good: pa.Table, *, on_state: int | None, label: int) -> dict:
    """label_map for row 0: pattern 1 on its fail dies, ``label`` on the first die in ``on_state``."""
    die = np.frombuffer(good.column("die_map")[0].as_py(), np.uint8)
    labels = np.where(die == 2, 1, 0).astype(np.uint8)
    labels[np.flatnonzero(die == (2 if on_state is None else on_state))[0]] = label
    return {"label_map": labels.tobytes()}


# one bad row per contract rule; a rule added to REASONS without an example here fails below
BAD_ROW_BY_REASON = {
    "wafer_id_null": lambda good: {"wafer_id": None},
    "wafer_id_duplicate": lambda good: {"wafer_id": "W0003"},
    "size_out_of_range": lambda good: {"height": 0},
    "die_map_null": lambda good: {"die_map": None},
    "die_map_length": lambda good: {"die_map": b"\x01" * 34},
    "die_map_values": lambda good: {"die_map": b"\x03" * 35},
    "label_map_length": lambda good: {"label_map": b"\x00" * 34},
    "label_map_values": lambda good: _bad_label_row(good, on_state=None, label=N_CLASSES),
    "label_on_non_fail_die": lambda good: _bad_label_row(good, on_state=1, label=2),
    "captured_at_out_of_range": lambda good: {"captured_at": datetime(9999, 12, 31, tzinfo=timezone.utc)},
}


@pytest.mark.parametrize("reason", REASONS)
def test_every_reason_quarantines_a_row_that_breaks_its_rule(reason):
    if reason == "captured_at_invalid":  # needs a text column: test_captured_at_invalid_strings
        good = good_table(1)
        loose = good.set_column(2, "captured_at", pa.array(["not a date"], pa.string()))
        assert validate_table(loose, n_classes=N_CLASSES).counts == {reason: 1}
        return
    good = good_table()
    assert reason in BAD_ROW_BY_REASON, f"quarantine reason {reason!r} has no example bad row in this file"
    assert_only_bad_quarantined(with_bad_row(good, **BAD_ROW_BY_REASON[reason](good)), good, reason)


@pytest.mark.parametrize("bad_id", [None, "", "   "])
def test_wafer_id_null_or_empty(bad_id):
    good = good_table()
    assert_only_bad_quarantined(with_bad_row(good, wafer_id=bad_id), good, "wafer_id_null")


def test_wafer_id_duplicate_within_table_keeps_first():
    good = good_table()
    assert_only_bad_quarantined(with_bad_row(good, wafer_id="W0003"), good, "wafer_id_duplicate")


def test_wafer_id_duplicate_of_known_id():
    good = good_table()
    table = with_bad_row(good, wafer_id="SEEN-LAST-NIGHT")
    assert_only_bad_quarantined(table, good, "wafer_id_duplicate", known={"SEEN-LAST-NIGHT", "other"})


@pytest.mark.parametrize("h,w", [(0, 35), (5, 0), (-1, 35), (1025, 1), (None, 35), (5, None)])
def test_size_out_of_range(h, w):
    good = good_table()
    assert_only_bad_quarantined(with_bad_row(good, height=h, width=w), good, "size_out_of_range")


def test_size_upper_bound_is_allowed():
    die = np.ones((1024, 3), np.uint8)
    table = make_table(wafer_ids=["big"], die_maps=[die])
    assert validate_table(table, n_classes=N_CLASSES).valid.num_rows == 1


def test_die_map_null():
    good = good_table()
    assert_only_bad_quarantined(with_bad_row(good, die_map=None), good, "die_map_null")


@pytest.mark.parametrize("nbytes", [0, 34, 36])
def test_die_map_length(nbytes):
    good = good_table()  # row 0 is 5 x 7 = 35 dies
    assert_only_bad_quarantined(with_bad_row(good, die_map=b"\x01" * nbytes), good, "die_map_length")


@pytest.mark.parametrize("value", [3, 128, 255])
def test_die_map_values(value):
    good = good_table()
    die = bytearray(good.column("die_map")[0].as_py())
    die[17] = value
    assert_only_bad_quarantined(with_bad_row(good, die_map=bytes(die)), good, "die_map_values")


def test_label_map_length():
    good = good_table()
    assert_only_bad_quarantined(with_bad_row(good, label_map=b"\x00" * 34), good, "label_map_length")


def test_label_map_values():
    good = good_table()
    die = np.frombuffer(good.column("die_map")[0].as_py(), np.uint8)
    label = np.zeros_like(die)
    label[np.flatnonzero(die == 2)[0]] = N_CLASSES  # an unknown class on a fail die
    assert_only_bad_quarantined(with_bad_row(good, label_map=label.tobytes()), good, "label_map_values")


@pytest.mark.parametrize("die_state", [0, 1])
def test_label_on_non_fail_die(die_state):
    good = good_table()
    die = np.frombuffer(good.column("die_map")[0].as_py(), np.uint8)
    label = np.where(die == 2, 1, 0).astype(np.uint8)
    label[np.flatnonzero(die == die_state)[0]] = 2
    assert_only_bad_quarantined(with_bad_row(good, label_map=label.tobytes()), good, "label_on_non_fail_die")


def test_captured_at_invalid_strings():
    good = good_table(4)
    loose = good.set_column(2, "captured_at", good.column("captured_at").cast(pa.string()))
    loose = loose.set_column(2, "captured_at", pa.array(
        ["2024-05-01T12:00:00Z", None, "2024-05-02 12:00:00+02:00", "not a date"], pa.string()))
    result = validate_table(loose, n_classes=N_CLASSES)
    assert result.quarantine.column("reason").to_pylist() == ["captured_at_invalid"]
    assert result.quarantine.column("captured_at").to_pylist() == ["not a date"]  # kept as it came
    assert result.valid.column("captured_at").to_pylist() == [
        datetime(2024, 5, 1, 12, tzinfo=timezone.utc), None, datetime(2024, 5, 2, 10, tzinfo=timezone.utc)]


def test_naive_time_strings_are_invalid_not_guessed():
    good = good_table(1)
    loose = good.set_column(2, "captured_at", pa.array(["2024-05-01 12:00:00"], pa.string()))
    assert validate_table(loose, n_classes=N_CLASSES).counts == {"captured_at_invalid": 1}


@pytest.mark.parametrize("epoch_type", [pa.int64(), pa.int32(), pa.float64()])
def test_epoch_numbers_are_refused_not_read_as_microseconds(epoch_type):
    good = good_table(2)
    seconds = pa.array([1_714_564_800, None], pa.int64()).cast(epoch_type)  # 2024-05-01 12:00 UTC in seconds
    with pytest.raises(WaferTableError, match="captured_at.*not epoch numbers"):
        validate_table(good.set_column(2, "captured_at", seconds), n_classes=N_CLASSES)


def test_all_null_numeric_captured_at_is_just_absent():
    good = good_table(2)
    result = validate_table(good.set_column(2, "captured_at", pa.nulls(2, pa.int64())), n_classes=N_CLASSES)
    assert result.n_valid == 2 and result.valid.column("captured_at").null_count == 2


@pytest.mark.parametrize("moment", [datetime(1, 1, 1, tzinfo=timezone.utc), datetime(9999, 12, 31, tzinfo=timezone.utc),
                                    datetime(1989, 12, 31, 23, 59, tzinfo=timezone.utc),
                                    datetime(2101, 1, 1, tzinfo=timezone.utc)])
def test_captured_at_out_of_range(moment):
    good = good_table()
    assert_only_bad_quarantined(with_bad_row(good, captured_at=moment), good, "captured_at_out_of_range")


def test_captured_at_range_bounds_are_accepted():
    good = good_table(2)
    edges = pa.array([datetime(1990, 1, 1, tzinfo=timezone.utc), datetime(2100, 12, 31, 23, 59, tzinfo=timezone.utc)],
                     pa.timestamp("us", tz="UTC"))
    assert validate_table(good.set_column(2, "captured_at", edges), n_classes=N_CLASSES).n_valid == 2


def test_out_of_range_strings_and_unreadable_strings_get_their_own_reasons():
    good = good_table(3)
    loose = good.set_column(2, "captured_at", pa.array(["0001-01-01T00:00:00Z", "nope", "2024-05-01T00:00:00Z"]))
    result = validate_table(loose, n_classes=N_CLASSES)
    assert result.quarantine.column("reason").to_pylist() == ["captured_at_out_of_range", "captured_at_invalid"]
    assert result.n_valid == 1


def test_first_broken_rule_wins():
    good = good_table()
    # duplicate id AND bad die values: reported as the duplicate (earlier in REASONS)
    table = with_bad_row(good, wafer_id="W0001", die_map=b"\x09" * 35)
    assert validate_table(table, n_classes=N_CLASSES).counts == {"wafer_id_duplicate": 1}


def test_many_bad_rows_counted_per_reason():
    good = good_table(8)
    table = pa.concat_tables([
        with_bad_row(good, wafer_id=None),
        with_bad_row(good, wafer_id="X1", height=0).slice(8),
        with_bad_row(good, wafer_id="X2", height=0).slice(8),
    ])
    result = validate_table(table, n_classes=N_CLASSES)
    assert result.counts == {"wafer_id_null": 1, "size_out_of_range": 2}
    assert result.valid.equals(good)


def test_extra_columns_kept_in_quarantine_not_in_valid():
    good = good_table(3)
    table = with_bad_row(good, height=0)
    table = table.append_column("fab", pa.array(["F1", "F2", "F3", "F4"]))
    result = validate_table(table, n_classes=N_CLASSES)
    assert result.valid.schema.equals(WAFER_SCHEMA)
    assert result.quarantine.column_names == [*WAFER_SCHEMA.names, "fab", "reason"]
    assert result.quarantine.column("fab").to_pylist() == ["F4"]


def test_loose_types_and_missing_nullable_columns_are_cast():
    good = good_table(3).select(["wafer_id", "height", "width", "die_map"])
    loose = pa.table({
        "wafer_id": good.column("wafer_id"),
        "height": good.column("height").cast(pa.int64()),
        "width": good.column("width").cast(pa.int16()),
        "die_map": good.column("die_map").cast(pa.large_binary()),
    })
    result = validate_table(loose, n_classes=N_CLASSES)
    assert result.valid.schema.equals(WAFER_SCHEMA)
    assert result.valid.num_rows == 3
    assert result.valid.column("label_map").null_count == 3


def test_old_reason_column_is_replaced():
    good = good_table(2)
    table = with_bad_row(good, height=0).append_column("reason", pa.array(["x", "y", "old"]))
    q = validate_table(table, n_classes=N_CLASSES).quarantine
    assert q.column_names.count("reason") == 1 and q.column("reason").to_pylist() == ["size_out_of_range"]


def test_missing_required_column_raises():
    with pytest.raises(WaferTableError, match="die_map"):
        validate_table(good_table(2).drop_columns(["die_map"]), n_classes=N_CLASSES)


def test_unusable_column_type_raises():
    table = good_table(2)
    table = table.set_column(5, "die_map", pa.array([[1, 2], [0]], pa.list_(pa.uint8())))
    with pytest.raises(WaferTableError, match="die_map"):
        validate_table(table, n_classes=N_CLASSES)


def test_empty_table():
    result = validate_table(WAFER_SCHEMA.empty_table(), n_classes=N_CLASSES)
    assert result.valid.num_rows == 0 and result.quarantine.num_rows == 0 and result.counts == {}


def test_sliced_chunked_input():
    good = good_table(8)
    more = good_table(4, start=100)
    first = with_bad_row(good, die_map=b"\x05" * 35)
    table = pa.concat_tables([first, more.cast(first.schema)]).slice(1)
    assert table.column("die_map").num_chunks == 3
    result = validate_table(table, n_classes=N_CLASSES)
    assert result.counts == {"die_map_values": 1}
    assert result.valid.num_rows == 7 + 4


def test_real_wm811k_maps_are_all_valid(real_maps: Path):
    """Every real map passes the contract (its speed is measured by bench, not asserted here)."""
    table = pq.read_table(real_maps)
    result = validate_table(table, n_classes=N_CLASSES)
    assert result.valid.num_rows == table.num_rows == 12_450
    assert result.counts == {}
