"""Steps shared by the flows (plain functions that call tasks inside a running flow)."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger

from fcn_core.config import Config
from tasks.data import check_quarantine, content_hash, drop_files, ingest_file
from tasks.runtime import persisted


def ingest_drops(cfg: Config, *, source: str, curated_root: Path | str, max_quarantined_share: float) -> dict:
    """Ingest every Parquet file of ``source`` (cached by content), then gate on the quarantined share.

    Files go one at a time: ingest read-modify-writes the store's manifest. A file that fails is
    logged and retried next run; the run fails only when no file could be ingested at all.
    """
    log = get_run_logger()
    ingest = persisted(ingest_file, cfg.home_dir)
    reports, failed = [], {}
    for path in drop_files(source):
        state = ingest(path=path, content_digest=content_hash(path), curated_root=str(curated_root),
                       n_classes=cfg.n_classes, split=cfg.data.split.model_dump(mode="json"), return_state=True)
        if state.is_completed():
            reports.append(state.result())
        else:
            failed[path] = state.message or state.name
    for path, why in failed.items():
        log.warning("not ingested (retried next run): %s: %s", path, why)
    if failed and not reports:
        raise RuntimeError(f"no drop file of {source} could be ingested: {failed}")
    quality = check_quarantine(reports, max_quarantined_share=max_quarantined_share)
    return {"source": str(source), "files": len(reports), "failed": failed, **quality}
