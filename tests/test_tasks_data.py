import json
import shutil

import pyarrow as pa
import pytest
from prefect import flow

from fcn_core.config import SplitConfig, SynthConfig
from fcn_core.ingest import MANIFEST_NAME, ingest
from fcn_core.synth import generate_wafers
from fcn_core.table import read_parquet, write_parquet_atomic
from tasks.data import (
    DataQualityError,
    IngestFileError,
    check_quarantine,
    content_hash,
    drop_files,
    ingest_file,
    snapshot_splits,
)
from tasks.runtime import persisted

SYNTH = SynthConfig(n_wafers=30, seed=3, wafers_per_lot=2, size_max=30)
SPLIT = SplitConfig().model_dump(mode="json")


def drop(path, *, seed: int = 3, n: int = 30, start_index: int = 0) -> str:
    table = generate_wafers(n, seed=seed, synth=SYNTH, start_index=start_index)
    write_parquet_atomic(table, path)
    return str(path)


@flow
def ingest_all(paths: list[str], home: str, curated: str) -> list[str]:
    task = persisted(ingest_file, home).with_options(retries=0)
    states = [task(path=p, content_digest=content_hash(p), curated_root=curated, n_classes=5, split=SPLIT,
                   return_state=True) for p in paths]
    return [s.type.value if not s.is_completed() else ("CACHED" if s.name == "Cached" else "RAN") for s in states]


def test_content_hash_is_the_digest_ingest_records(tmp_path):
    path = drop(tmp_path / "a.parquet")
    ingest([path], tmp_path / "curated", n_classes=5, split=SplitConfig())
    manifest = json.loads((tmp_path / "curated" / MANIFEST_NAME).read_text())
    assert list(manifest["sources"]) == [content_hash(path)]


def test_drop_files_lists_a_folder_and_keeps_uri_schemes(tmp_path):
    a, b = drop(tmp_path / "d" / "a.parquet"), drop(tmp_path / "d" / "b.parquet", seed=4)
    assert drop_files(str(tmp_path / "d")) == [a, b]
    assert drop_files(f"file://{tmp_path / 'd'}") == [f"file://{a}", f"file://{b}"]


def test_ingest_is_cached_on_content_not_path(prefect_harness, tmp_path):
    home, curated = tmp_path / "home", str(tmp_path / "curated")
    a = drop(tmp_path / "a.parquet")
    renamed = tmp_path / "renamed.parquet"
    shutil.copy(a, renamed)
    b = drop(tmp_path / "b.parquet", seed=4)

    assert ingest_all([a, str(renamed), b], str(home), curated) == ["RAN", "CACHED", "RAN"]
    assert ingest_all([a, b], str(home), curated) == ["CACHED", "CACHED"]
    assert any((home / "prefect-results").iterdir())  # persisted under the project home

    drop(a, seed=5)  # same path, new content: ingested again
    assert ingest_all([a], str(home), curated) == ["RAN"]
    manifest = json.loads((tmp_path / "curated" / MANIFEST_NAME).read_text())
    assert len(manifest["sources"]) == 3


def test_unreadable_file_fails_its_task_and_is_not_cached(prefect_harness, tmp_path):
    home, curated = tmp_path / "home", str(tmp_path / "curated")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    assert ingest_all([str(bad)], str(home), curated) == ["FAILED"]
    assert ingest_all([str(bad)], str(home), curated) == ["FAILED"]  # tried again, not served from cache
    with pytest.raises(IngestFileError, match="bad.parquet"):
        ingest_file.fn(path=str(bad), content_digest="x", curated_root=curated, n_classes=5, split=SPLIT)


def test_quarantine_gate(prefect_harness):
    reports = [{"rows_valid": 90, "rows_quarantined": 10, "counts": {"die_map_values": 10}},
               {"rows_valid": 0, "rows_quarantined": 0, "counts": {}}]
    ok = check_quarantine.fn(reports, max_quarantined_share=0.2)
    assert ok == {"rows_valid": 90, "rows_quarantined": 10, "quarantined_share": 0.1,
                  "reasons": {"die_map_values": 10}}
    with pytest.raises(DataQualityError, match="10.0%.*die_map_values"):
        check_quarantine.fn(reports, max_quarantined_share=0.05)


def test_snapshot_splits_writes_labelled_wafers_per_split(prefect_harness, tmp_path):
    labelled = generate_wafers(40, seed=3, synth=SYNTH)
    unlabelled = generate_wafers(10, seed=9, synth=SYNTH)
    unlabelled = unlabelled.set_column(unlabelled.schema.get_field_index("label_map"), "label_map",
                                       pa.nulls(unlabelled.num_rows, pa.binary()))
    write_parquet_atomic(labelled, tmp_path / "l.parquet")
    write_parquet_atomic(unlabelled, tmp_path / "u.parquet")
    ingest([tmp_path / "l.parquet", tmp_path / "u.parquet"], tmp_path / "curated", n_classes=5, split=SplitConfig())

    out = snapshot_splits(curated_root=str(tmp_path / "curated"), out_dir=str(tmp_path / "snap"), pad_multiple=32,
                          pad_fixed=None)
    assert sum(out["counts"].values()) == 40  # unlabelled (production) wafers are not training data
    ids = set()
    for split, path in out["paths"].items():
        table = read_parquet(path)
        assert table.num_rows == out["counts"][split] > 0
        assert table.column("label_map").null_count == 0
        ids |= set(table.column("wafer_id").to_pylist())
    assert ids == set(labelled.column("wafer_id").to_pylist())
    assert out["max_side"] <= 30 and all(n >= 1 for n in out["padded_shapes"].values())


def test_snapshot_without_a_split_is_a_clear_error(prefect_harness, tmp_path):
    write_parquet_atomic(generate_wafers(4, seed=3, synth=SYNTH), tmp_path / "l.parquet")
    ingest([tmp_path / "l.parquet"], tmp_path / "curated", n_classes=5,
           split=SplitConfig(train=1.0, val=0.0, test=0.0))
    with pytest.raises(DataQualityError, match="no labelled wafers in the 'val' split"):
        snapshot_splits.fn(curated_root=str(tmp_path / "curated"), out_dir=str(tmp_path / "s"), pad_multiple=32,
                           pad_fixed=None)
