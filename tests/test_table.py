"""fcn_core.table: reading and the atomic Parquet writers (one-shot and streaming)."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fcn_core.table import (
    WAFER_SCHEMA, WaferTableError, die_maps, make_table, read_parquet, write_parquet_atomic,
    write_parquet_chunks_atomic,
)


def wafers(n: int, start: int = 0) -> pa.Table:
    return make_table(wafer_ids=[f"w{start + i}" for i in range(n)],
                      die_maps=[np.full((2, 3), 1 + i % 2, np.uint8) for i in range(n)])


def test_roundtrip_and_maps(tmp_path):
    table = wafers(3)
    path = write_parquet_atomic(table, tmp_path / "a" / "t.parquet")
    assert read_parquet(path).equals(table)
    assert [m.tolist() for m in die_maps(table)][1] == [[2, 2, 2], [2, 2, 2]]
    assert os.listdir(tmp_path / "a") == ["t.parquet"]


def test_one_shot_writer_bytes_equal_pyarrow_write_table(tmp_path):
    """The shared writer changes no output byte (nightly predictions are compared by hash)."""
    table = wafers(50)
    pq.write_table(table, tmp_path / "ref.parquet", compression="zstd")
    write_parquet_atomic(table, tmp_path / "ours.parquet")
    assert (tmp_path / "ours.parquet").read_bytes() == (tmp_path / "ref.parquet").read_bytes()


def test_streaming_writer_concatenates_and_casts(tmp_path):
    loose = wafers(2, start=10).cast(pa.schema([pa.field(f.name, f.type) for f in WAFER_SCHEMA]))
    path = write_parquet_chunks_atomic(iter([wafers(3), loose]), tmp_path / "s.parquet")
    out = read_parquet(path)
    assert out.schema.equals(WAFER_SCHEMA) and out.column("wafer_id").to_pylist() == ["w0", "w1", "w2", "w10", "w11"]


def test_streaming_writer_failure_keeps_old_file_and_leaves_no_temp(tmp_path):
    dest = tmp_path / "s.parquet"
    write_parquet_atomic(wafers(1), dest)

    def chunks():
        yield wafers(2)
        raise RuntimeError("generator broke mid-file")

    with pytest.raises(RuntimeError, match="mid-file"):
        write_parquet_chunks_atomic(chunks(), dest)
    assert read_parquet(dest).num_rows == 1 and os.listdir(tmp_path) == ["s.parquet"]
    with pytest.raises(ValueError, match="nothing to write"):
        write_parquet_chunks_atomic(iter([]), dest)
    assert os.listdir(tmp_path) == ["s.parquet"]
    empty = write_parquet_chunks_atomic(iter([]), tmp_path / "e.parquet", schema=WAFER_SCHEMA)
    assert read_parquet(empty).num_rows == 0


def test_writing_onto_a_folder_is_one_clear_error_and_no_temp(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(WaferTableError, match="is a folder"):
        write_parquet_atomic(wafers(1), tmp_path / "out")
    assert os.listdir(tmp_path / "out") == [] and os.listdir(tmp_path) == ["out"]


def test_unreadable_files_get_one_line_naming_them(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 nope")
    with pytest.raises(WaferTableError) as info:
        read_parquet(tmp_path / "bad.parquet")
    assert str(tmp_path / "bad.parquet") in str(info.value) and "\n" not in str(info.value)
    part = tmp_path / "cur" / "date=2024-05-01" / "part-abc.parquet"
    write_parquet_atomic(wafers(2), part)
    part.write_bytes(part.read_bytes()[:-30])
    with pytest.raises(WaferTableError, match="truncated or corrupt curated part file.*ingest its source"):
        read_parquet(part)
