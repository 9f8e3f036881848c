"""Ingestion: partitions, quarantine, idempotency, cross-file duplicates, atomicity and the split."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fcn_core.config import SplitConfig
from fcn_core.ingest import (
    CURATED_SCHEMA, MANIFEST_NAME, READ_SCHEMA, assign_splits, ingest, list_partitions, read_curated,
)
from fcn_core.table import WAFER_SCHEMA, WaferTableError, make_table

N_CLASSES = 5
SPLIT = SplitConfig()
NOW = datetime(2024, 6, 30, 23, 59, tzinfo=timezone.utc)


def drop(ids, *, lots=None, days=None, bad_ids=()) -> pa.Table:
    """Small valid wafers; ``days`` are day-of-May or None; ids in ``bad_ids`` get a broken die map."""
    die = np.array([[0, 1, 0], [1, 2, 1], [0, 1, 0]], np.uint8)
    table = make_table(
        wafer_ids=list(ids),
        die_maps=[die] * len(ids),
        label_maps=[np.where(die == 2, 3, 0).astype(np.uint8)] * len(ids),
        lot_ids=lots,
        captured_at=None if days is None else [
            None if d is None else datetime(2024, 5, d, 8, tzinfo=timezone.utc) for d in days],
    )
    if bad_ids:
        blobs = [b"\x07" * 9 if i in bad_ids else b for i, b in zip(ids, table.column("die_map").to_pylist())]
        table = table.set_column(5, WAFER_SCHEMA.field("die_map"), pa.array(blobs, pa.binary()))
    return table


def write(table: pa.Table, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return str(path)


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_ingest_partitions_by_date_and_quarantines(tmp_path):
    src = write(drop(["a", "b", "c", "d", "e"], days=[1, 1, 2, None, 2], bad_ids={"e"}), tmp_path / "in/n1.parquet")
    report = ingest(src, tmp_path / "cur", n_classes=N_CLASSES, split=SPLIT, now=NOW)
    assert report.files_ingested == [src] and report.files_skipped == [] and report.files_failed == {}
    assert report.rows_valid == 4 and report.rows_quarantined == 1
    assert report.counts == {"die_map_values": 1}
    assert report.partitions == ["2024-05-01", "2024-05-02", "2024-06-30"]  # null captured_at -> NOW
    assert list_partitions(tmp_path / "cur") == report.partitions

    cur = read_curated(tmp_path / "cur")
    assert cur.schema.equals(READ_SCHEMA)
    assert dict(zip(cur.column("wafer_id").to_pylist(), cur.column("date").to_pylist())) == {
        "a": "2024-05-01", "b": "2024-05-01", "c": "2024-05-02", "d": "2024-06-30"}
    parts = sorted((tmp_path / "cur").glob("date=*/part-*.parquet"))
    assert len(parts) == 3 and all(pq.read_schema(p).equals(CURATED_SCHEMA) for p in parts)

    quarantine = list((tmp_path / "cur" / "_quarantine").glob("*.parquet"))
    assert len(quarantine) == 1
    q = pq.read_table(quarantine[0])
    assert q.column("wafer_id").to_pylist() == ["e"] and q.column("reason").to_pylist() == ["die_map_values"]
    assert q.column("die_map").to_pylist() == [b"\x07" * 9]  # original bytes


def test_good_rows_are_unchanged_in_the_store(tmp_path):
    table = drop(["a", "b", "c"], lots=["L1", None, "L2"], days=[3, 4, None])
    src = write(table, tmp_path / "in.parquet")
    ingest(src, tmp_path / "cur", n_classes=N_CLASSES, split=SPLIT, now=NOW)
    back = read_curated(tmp_path / "cur").sort_by("wafer_id").select(WAFER_SCHEMA.names)
    assert back.cast(WAFER_SCHEMA).equals(table)


def test_reingest_same_file_is_a_noop(tmp_path):
    src = write(drop(["a", "b", "c"], days=[1, 2, None], bad_ids={"c"}), tmp_path / "in/n1.parquet")
    first = ingest(src, tmp_path / "cur", n_classes=N_CLASSES, split=SPLIT, now=NOW)
    before = tree(tmp_path / "cur")
    later = datetime(2024, 7, 15, tzinfo=timezone.utc)
    copy = tmp_path / "copy.parquet"  # same content under another name: also skipped
    copy.write_bytes(Path(src).read_bytes())
    second = ingest([src, str(tmp_path / "in")], tmp_path / "cur", n_classes=N_CLASSES, split=SPLIT, now=later)
    assert first.files_ingested == [src]
    assert second.files_ingested == [] and second.files_skipped == [src, src]
    assert second.rows_valid == second.rows_quarantined == 0 and second.partitions == []
    assert tree(tmp_path / "cur") == before  # byte-for-byte the same files
    assert ingest(copy, tmp_path / "cur", n_classes=N_CLASSES, split=SPLIT).files_skipped == [str(copy)]
    assert tree(tmp_path / "cur") == before


def test_duplicate_ids_across_files_and_runs_are_quarantined(tmp_path):
    n1 = write(drop(["a", "b"], days=[1, 1]), tmp_path / "in/n1.parquet")
    n2 = write(drop(["b", "c"], days=[2, 2]), tmp_path / "in/n2.parquet")  # b reused the next night
    seen = []
    report = ingest(str(tmp_path / "in"), tmp_path / "cur", n_classes=N_CLASSES, split=SPLIT, now=NOW,
                    progress=lambda done, total, name: seen.append((done, total, name)))
    assert report.files_ingested == [n1, n2]
    assert seen == [(1, 2, n1), (2, 2, n2)]
    assert report.rows_valid == 3 and report.counts == {"wafer_id_duplicate": 1}
    # and in a later run, against what is already curated
    n3 = write(drop(["c", "d"], days=[3, 3]), tmp_path / "later/n3.parquet")
    report = ingest(n3, tmp_path / "cur", n_classes=N_CLASSES, split=SPLIT, now=NOW)
    assert report.rows_valid == 1 and report.counts == {"wafer_id_duplicate": 1}
    ids = read_curated(tmp_path / "cur").column("wafer_id").to_pylist()
    assert sorted(ids) == ["a", "b", "c", "d"]


def test_no_temporary_files_left_and_manifest_is_json(tmp_path):
    src = write(drop(["a", "b"], days=[1, None], bad_ids={"b"}), tmp_path / "in.parquet")
    ingest(src, tmp_path / "cur", n_classes=N_CLASSES, split=SPLIT, now=NOW)
    names = [p.name for p in (tmp_path / "cur").rglob("*")]
    assert not [n for n in names if ".tmp" in n]
    manifest = json.loads((tmp_path / "cur" / MANIFEST_NAME).read_text())
    (entry,) = manifest["sources"].values()
    assert entry["source"] == src and entry["rows_valid"] == 1 and entry["rows_quarantined"] == 1


def test_interrupted_run_is_repaired_not_duplicated(tmp_path):
    """Part files written but manifest not updated (crash): the re-run rewrites, no duplicates."""
    src = write(drop(["a", "b"], days=[None, 1]), tmp_path / "in.parquet")
    ingest(src, tmp_path / "cur", n_classes=N_CLASSES, split=SPLIT, now=NOW)
    (tmp_path / "cur" / MANIFEST_NAME).unlink()
    report = ingest(src, tmp_path / "cur", n_classes=N_CLASSES, split=SPLIT,
                    now=datetime(2024, 7, 2, tzinfo=timezone.utc))
    assert report.rows_valid == 2 and report.rows_quarantined == 0
    cur = read_curated(tmp_path / "cur")
    assert sorted(cur.column("wafer_id").to_pylist()) == ["a", "b"]
    # the part of the first attempt under 2024-06-30 (null captured_at -> then "now") is gone
    assert list_partitions(tmp_path / "cur") == ["2024-05-01", "2024-07-02"]
    assert dict(zip(cur.column("wafer_id").to_pylist(), cur.column("date").to_pylist()))["a"] == "2024-07-02"


def test_unreadable_file_is_reported_and_others_go_on(tmp_path):
    good = write(drop(["a"], days=[1]), tmp_path / "in/a.parquet")
    (tmp_path / "in/b.parquet").write_bytes(b"this is not parquet")
    nocols = write(pa.table({"x": [1]}), tmp_path / "in/c.parquet")
    report = ingest(str(tmp_path / "in"), tmp_path / "cur", n_classes=N_CLASSES, split=SPLIT, now=NOW)
    assert report.files_ingested == [good]
    assert set(report.files_failed) == {str(tmp_path / "in/b.parquet"), nocols}
    assert "missing required column" in report.files_failed[nocols]
    # failures are not recorded: fixing the file and re-running ingests it
    write(drop(["z"], days=[1]), tmp_path / "in/b.parquet")
    again = ingest(str(tmp_path / "in"), tmp_path / "cur", n_classes=N_CLASSES, split=SPLIT, now=NOW)
    assert again.files_ingested == [str(tmp_path / "in/b.parquet")]


def test_missing_source_raises_before_writing(tmp_path):
    ok = write(drop(["a"]), tmp_path / "a.parquet")
    with pytest.raises(WaferTableError, match="no such file"):
        ingest([ok, str(tmp_path / "nope.parquet")], tmp_path / "cur", n_classes=N_CLASSES, split=SPLIT)
    assert not (tmp_path / "cur").exists()


def test_pyarrow_uri_sources_and_store(tmp_path):
    src = write(drop(["a", "b"], days=[1, 2]), tmp_path / "in/x.parquet")
    report = ingest(f"file://{tmp_path}/in", f"file://{tmp_path}/cur", n_classes=N_CLASSES, split=SPLIT, now=NOW)
    assert report.files_ingested == [f"file://{src}"] and report.rows_valid == 2
    assert read_curated(f"file://{tmp_path}/cur").num_rows == 2
    assert list_partitions(tmp_path / "cur") == ["2024-05-01", "2024-05-02"]


def test_read_curated_filters(tmp_path):
    ids = [f"w{i}" for i in range(60)]
    src = write(drop(ids, days=[1 + i % 3 for i in range(60)]), tmp_path / "in.parquet")
    ingest(src, tmp_path / "cur", n_classes=N_CLASSES, split=SPLIT, now=NOW)
    assert read_curated(tmp_path / "cur").num_rows == 60
    day1 = read_curated(tmp_path / "cur", dates=["2024-05-01"])
    assert day1.num_rows == 20 and set(day1.column("date").to_pylist()) == {"2024-05-01"}
    train = read_curated(tmp_path / "cur", splits=["train"])
    assert set(train.column("split").to_pylist()) == {"train"} and 0 < train.num_rows < 60
    assert read_curated(tmp_path / "nothing-here").num_rows == 0
    with pytest.raises(ValueError, match="unknown split"):
        read_curated(tmp_path / "cur", splits=["training"])


def test_read_curated_matches_the_part_files_in_date_then_part_order(tmp_path):
    """The pyarrow.dataset reader returns what reading each part file in order did (plus its date)."""
    a = write(drop([f"a{i}" for i in range(6)], days=[3, 1, 2, 1, 3, 2]), tmp_path / "in/a.parquet")
    b = write(drop([f"b{i}" for i in range(4)], days=[2, 2, 1, 3]), tmp_path / "in/b.parquet")
    ingest([a, b], tmp_path / "cur", n_classes=N_CLASSES, split=SPLIT, now=NOW)
    expected = []
    for part in sorted((tmp_path / "cur").glob("date=*/part-*.parquet")):
        t = pq.read_table(part)
        expected += [(r["wafer_id"], r["split"], part.parent.name[len("date="):]) for r in t.to_pylist()]
    cur = read_curated(tmp_path / "cur")
    assert cur.schema.equals(READ_SCHEMA)
    assert list(zip(*(cur.column(c).to_pylist() for c in ("wafer_id", "split", "date")))) == expected
    assert cur.select(WAFER_SCHEMA.names).cast(WAFER_SCHEMA).to_pylist() == [
        r for part in sorted((tmp_path / "cur").glob("date=*/part-*.parquet"))
        for r in pq.read_table(part).select(WAFER_SCHEMA.names).to_pylist()]


# -- damaged stores: one line naming the file and the fix, then the fix works -------------------------
@pytest.mark.parametrize("content", [b'{"version": 1, "sources": {"ab', b"\xff\xfe", b"[1, 2]"])
def test_corrupt_manifest_names_the_file_and_the_fix(tmp_path, content):
    src = write(drop(["a", "b"], days=[1, 2]), tmp_path / "in.parquet")
    ingest(src, tmp_path / "cur", n_classes=N_CLASSES, split=SPLIT, now=NOW)
    manifest = tmp_path / "cur" / MANIFEST_NAME
    manifest.write_bytes(content)
    with pytest.raises(WaferTableError) as info:
        ingest(src, tmp_path / "cur", n_classes=N_CLASSES, split=SPLIT, now=NOW)
    message = str(info.value)
    assert str(manifest) in message and "ingest the drops again" in message and "\n" not in message
    manifest.unlink()  # the advice: move it away, ingest again -> same store, no duplicates
    report = ingest(src, tmp_path / "cur", n_classes=N_CLASSES, split=SPLIT, now=NOW)
    assert report.rows_valid == 2 and report.rows_quarantined == 0
    assert sorted(read_curated(tmp_path / "cur").column("wafer_id").to_pylist()) == ["a", "b"]


def test_truncated_part_names_the_file_and_reingest_repairs_it(tmp_path):
    src = write(drop(["a", "b", "c"], days=[1, 2, 2]), tmp_path / "in.parquet")
    ingest(src, tmp_path / "cur", n_classes=N_CLASSES, split=SPLIT, now=NOW)
    before = read_curated(tmp_path / "cur")
    (part,) = (tmp_path / "cur").glob("date=2024-05-02/part-*.parquet")
    part.write_bytes(part.read_bytes()[:100])
    for attempt in (lambda: read_curated(tmp_path / "cur"),
                    lambda: ingest(src, tmp_path / "cur", n_classes=N_CLASSES, split=SPLIT, now=NOW)):
        with pytest.raises(WaferTableError) as info:
            attempt()
        message = str(info.value)
        assert str(part) in message and "truncated or corrupt" in message and "ingest its source" in message
        assert "\n" not in message
    part.unlink()  # the advice: delete it and ingest the source again (not skipped: a part is missing)
    report = ingest(src, tmp_path / "cur", n_classes=N_CLASSES, split=SPLIT, now=NOW)
    assert report.files_ingested == [src] and report.rows_valid == 3
    assert read_curated(tmp_path / "cur").equals(before)


def test_temporary_files_of_dead_writers_are_cleaned_live_ones_kept(tmp_path):
    import subprocess
    import sys

    src = write(drop(["a"], days=[1]), tmp_path / "in.parquet")
    ingest(src, tmp_path / "cur", n_classes=N_CLASSES, split=SPLIT, now=NOW)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    leftovers = [tmp_path / "cur" / f".{MANIFEST_NAME}.tmp-{dead_pid}-0123abcd",
                 tmp_path / "cur" / "date=2024-05-01" / f".part-x.parquet.tmp-{dead_pid}-89abcdef",
                 tmp_path / "cur" / "_quarantine" / f".x.parquet.tmp-{dead_pid}-00000000"]
    live = tmp_path / "cur" / "date=2024-05-01" / f".part-y.parquet.tmp-{__import__('os').getppid()}-11111111"
    for p in [*leftovers, live]:
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"half a file")
    ingest(src, tmp_path / "cur", n_classes=N_CLASSES, split=SPLIT, now=NOW)
    assert not any(p.exists() for p in leftovers) and live.exists()


# -- split -------------------------------------------------------------------------------------------
def test_split_keeps_lots_together_and_follows_fractions():
    n_lots, per_lot = 2000, 5
    lots = [f"LOT{i:05d}" for i in range(n_lots) for _ in range(per_lot)]
    table = make_table(wafer_ids=[f"{lot}-{k}" for k, lot in enumerate(lots)],
                       die_maps=[np.ones((1, 1), np.uint8)] * len(lots), lot_ids=lots)
    splits = assign_splits(table, SPLIT).to_pylist()
    by_lot: dict[str, set[str]] = {}
    for lot, s in zip(lots, splits):
        by_lot.setdefault(lot, set()).add(s)
    assert all(len(s) == 1 for s in by_lot.values()), "a lot straddles splits"
    share = {s: splits.count(s) / len(splits) for s in ("train", "val", "test")}
    assert abs(share["train"] - 0.8) < 0.04 and abs(share["val"] - 0.1) < 0.03 and abs(share["test"] - 0.1) < 0.03


def test_split_is_deterministic_order_free_and_salted():
    lots = [f"L{i % 50}" if i % 7 else None for i in range(400)]
    table = make_table(wafer_ids=[f"w{i}" for i in range(400)], die_maps=[np.ones((1, 1), np.uint8)] * 400,
                       lot_ids=lots)
    a = assign_splits(table, SPLIT).to_pylist()
    reversed_table = table.take(pa.array(range(399, -1, -1)))
    assert assign_splits(reversed_table, SPLIT).to_pylist()[::-1] == a  # independent of batch / order
    assert assign_splits(table.slice(100, 50), SPLIT).to_pylist() == a[100:150]
    other = assign_splits(table, SplitConfig(salt="another")).to_pylist()
    assert other != a
    only_train = assign_splits(table, SplitConfig(train=1.0, val=0.0, test=0.0)).to_pylist()
    assert set(only_train) == {"train"}


def test_split_without_lot_uses_wafer_id():
    table = make_table(wafer_ids=[f"w{i}" for i in range(3000)], die_maps=[np.ones((1, 1), np.uint8)] * 3000)
    splits = assign_splits(table, SplitConfig(train=0.5, val=0.25, test=0.25)).to_pylist()
    assert abs(splits.count("train") / 3000 - 0.5) < 0.04
    assert abs(splits.count("test") / 3000 - 0.25) < 0.04
