import json

import pytest

from fcn_core.watermark import WATERMARK_NAME, Watermark


def record(wm: Watermark, date: str, parts: dict[str, int], *, replace: bool, version: str = "1") -> None:
    wm.record(date, parts=parts, replace=replace, output=f"/p/date={date}/predictions.parquet",
              rows=sum(parts.values()), model_name="wafer-fcn", model_version=version, flow_run_id="fr")


def test_plan_covers_never_scored_new_parts_removed_parts_and_missing_output(tmp_path):
    wm = Watermark.load(tmp_path / WATERMARK_NAME)
    assert wm.partitions == {}
    assert wm.plan("2026-01-01", ["part-a.parquet"], output_exists=False).action == "full"
    assert wm.plan("2026-01-01", [], output_exists=False).action == "skip"

    record(wm, "2026-01-01", {"part-a.parquet": 10}, replace=True)
    up_to_date = wm.plan("2026-01-01", ["part-a.parquet"], output_exists=True)
    assert (up_to_date.action, up_to_date.parts) == ("skip", ())

    grown = wm.plan("2026-01-01", ["part-b.parquet", "part-a.parquet"], output_exists=True)
    assert (grown.action, grown.parts) == ("append", ("part-b.parquet",))

    lost_output = wm.plan("2026-01-01", ["part-a.parquet"], output_exists=False)
    assert (lost_output.action, lost_output.parts) == ("full", ("part-a.parquet",))

    replaced = wm.plan("2026-01-01", ["part-c.parquet"], output_exists=True)
    assert (replaced.action, replaced.parts) == ("full", ("part-c.parquet",))


def test_record_appends_or_replaces_parts_and_tracks_model_versions(tmp_path):
    wm = Watermark.load(tmp_path / WATERMARK_NAME)
    record(wm, "2026-01-01", {"part-a.parquet": 10}, replace=True, version="1")
    record(wm, "2026-01-01", {"part-b.parquet": 5}, replace=False, version="2")
    entry = wm.partitions["2026-01-01"]
    assert entry["parts"] == {"part-a.parquet": 10, "part-b.parquet": 5}
    assert entry["model_versions"] == ["1", "2"]
    record(wm, "2026-01-01", {"part-c.parquet": 7}, replace=True, version="3")
    assert wm.partitions["2026-01-01"]["parts"] == {"part-c.parquet": 7}
    assert wm.partitions["2026-01-01"]["model_versions"] == ["3"]


def test_save_is_durable_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "predictions" / WATERMARK_NAME
    wm = Watermark.load(path)
    record(wm, "2026-01-02", {"part-a.parquet": 3}, replace=True)
    wm.save()
    again = Watermark.load(path)
    assert again.partitions == wm.partitions
    assert again.plan("2026-01-02", ["part-a.parquet"], output_exists=True).action == "skip"
    assert [p.name for p in path.parent.iterdir()] == [WATERMARK_NAME]
    assert json.loads(path.read_text())["format_version"] == 1


def test_corrupt_or_foreign_watermark_is_a_clear_error(tmp_path):
    path = tmp_path / WATERMARK_NAME
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Watermark.load(path)
    path.write_text(json.dumps({"something": "else"}))
    with pytest.raises(ValueError, match="not a wafer-fcn watermark"):
        Watermark.load(path)
