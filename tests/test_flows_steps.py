"""flows.steps.ingest_drops: every drop file ingested once, failures reported, the quarantine gate."""

from __future__ import annotations

import pyarrow as pa
import pytest
from prefect import flow

import flows.steps as steps
from fcn_core.config import Config, SynthConfig
from fcn_core.ingest import read_curated
from fcn_core.synth import generate_wafers
from fcn_core.table import write_parquet_atomic
from tasks.data import DataQualityError, ingest_file

SYNTH = SynthConfig(n_wafers=20, seed=3, wafers_per_lot=2, size_max=30)


@pytest.fixture(autouse=True)
def _no_retry_delays(monkeypatch):
    """ingest-file retries twice, 5 s apart, in production: a failing file would cost 10 s a test."""
    monkeypatch.setattr(steps, "ingest_file", ingest_file.with_options(retries=0))


def drop(path, *, seed: int, bad_rows: int = 0) -> str:
    table = generate_wafers(20, seed=seed, synth=SYNTH, start_index=100 * seed)
    if bad_rows:  # die states are 0/1/2: a 7 breaks the contract, and validation quarantines the row
        maps = table.column("die_map").to_pylist()
        maps[:bad_rows] = [b"\x07" * len(m) for m in maps[:bad_rows]]
        table = table.set_column(table.schema.get_field_index("die_map"), "die_map", pa.array(maps, pa.binary()))
    write_parquet_atomic(table, path)
    return str(path)


@flow
def run_ingest(home: str, source: str, curated: str, max_quarantined_share: float = 0.25) -> dict:
    return steps.ingest_drops(Config(home=home), source=source, curated_root=curated,
                              max_quarantined_share=max_quarantined_share)


def test_every_good_file_is_ingested_once_and_a_bad_one_is_reported(prefect_harness, tmp_path):
    drops, curated, home = tmp_path / "drops", tmp_path / "curated", str(tmp_path / "home")
    drop(drops / "a.parquet", seed=1)
    drop(drops / "b.parquet", seed=2)
    (drops / "c.parquet").write_bytes(b"not parquet")
    out = run_ingest(home, str(drops), str(curated))
    assert (out["source"], out["files"], out["rows_valid"], out["rows_quarantined"]) == (str(drops), 2, 40, 0)
    assert list(out["failed"]) == [str(drops / "c.parquet")] and out["failed"][str(drops / "c.parquet")]
    assert read_curated(curated).num_rows == 40
    again = run_ingest(home, str(drops), str(curated))  # unchanged drops: served from the cache
    assert again == out and read_curated(curated).num_rows == 40


def test_the_run_fails_when_no_file_could_be_ingested(prefect_harness, tmp_path):
    (tmp_path / "drops").mkdir()
    (tmp_path / "drops" / "x.parquet").write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="no drop file of .*drops could be ingested"):
        run_ingest(str(tmp_path / "home"), str(tmp_path / "drops"), str(tmp_path / "curated"))


def test_too_many_quarantined_rows_fail_the_run(prefect_harness, tmp_path):
    source = drop(tmp_path / "d.parquet", seed=4, bad_rows=5)  # 5 of 20 rows: 25 %
    home, curated = str(tmp_path / "home"), str(tmp_path / "curated")
    with pytest.raises(DataQualityError, match=r"5 of 20 ingested rows \(25.0%\).*die_map_values"):
        run_ingest(home, source, curated, max_quarantined_share=0.2)
    passed = run_ingest(home, source, curated, max_quarantined_share=0.3)
    assert passed["rows_valid"] == 15 and passed["quarantined_share"] == 0.25
    assert passed["reasons"] == {"die_map_values": 5}
