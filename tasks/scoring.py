"""The score_partition task of nightly-inference: one curated date partition -> one predictions file.

Output: ``<predictions_root>/date=YYYY-MM-DD/predictions.parquet``, written atomically. With
``action="append"`` only the partition's new part files are scored and added to the existing
file, so no wafer is scored twice. The model is named by registry name and version (never passed
as an object); each process loads its :class:`~fcn_core.scorer.Scorer` once and shares it between
task threads: scoring only reads it, so sharing needs no lock.
"""

from __future__ import annotations

import os
import threading

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from fcn_core.config import Config
from fcn_core.inference.runtime import resolve_device
from fcn_core.scorer import Scorer
from fcn_core.table import WAFER_COLUMNS, read_parquet, resolve_fs, write_parquet_atomic
from tracking.registry import load_scorer_uri

PREDICTIONS_FILE = "predictions.parquet"
PARTITION_PREFIX = "date="

_scorers: dict[tuple[str, str, str], Scorer] = {}
_loading = threading.Lock()  # concurrent first uses wait for one load instead of loading N times


def partition_dir(root: str, date: str) -> str:
    """``root/date=YYYY-MM-DD`` for a local path or a pyarrow URI."""
    return f"{str(root).rstrip('/')}/{PARTITION_PREFIX}{date}"


def predictions_path(predictions_root: str, date: str) -> str:
    return f"{partition_dir(predictions_root, date)}/{PREDICTIONS_FILE}"


def part_files(curated_root: str, date: str) -> list[str]:
    """Names of the curated part files of one date partition, sorted."""
    fs, folder = resolve_fs(partition_dir(curated_root, date))
    from pyarrow.fs import FileSelector, FileType

    entries = fs.get_file_info(FileSelector(folder, allow_not_found=True))
    return sorted(e.base_name for e in entries if e.type == FileType.File
                  and e.base_name.startswith("part-") and e.base_name.endswith(".parquet"))


def file_exists(path: str) -> bool:
    from pyarrow.fs import FileType

    fs, p = resolve_fs(path)
    return fs.get_file_info(p).type == FileType.File


def remember_scorer(tracking_uri: str, name: str, version: str, scorer: Scorer) -> None:
    """Seed this process's scorer cache (the flow already loaded the champion to check it exists)."""
    scorer.inference_net()  # make the fast copy once, before task threads share the scorer
    with _loading:
        _scorers[(tracking_uri, name, str(version))] = scorer


def registered_scorer(cfg: Config, name: str, version: str, *, device: str = "cpu") -> Scorer:
    """``models:/name/version`` of ``cfg``'s store as a scorer, from this process's cache (loaded on first use)."""
    key = (cfg.tracking_uri, name, str(version))
    with _loading:
        if key not in _scorers:
            scorer, _, _ = load_scorer_uri(f"models:/{name}/{version}", tracking_uri=cfg.tracking_uri, device=device)
            scorer.inference_net()
            _scorers[key] = scorer
        return _scorers[key]


@task(name="score-partition", task_run_name="score-{date}", cache_policy=NO_CACHE, retries=1,
      retry_delay_seconds=10)
def score_partition(*, cfg: Config, date: str, curated_root: str, parts: list[str], action: str,
                    predictions_root: str, model_name: str, model_version: str, run_ids: dict[str, str],
                    chunk_rows: int = 20_000) -> dict:
    """Score ``parts`` of one date partition and write its predictions file; returns what was written.

    ``action``: "full" rewrites the file from these parts; "append" adds them to the existing file.
    Rows are scored ``chunk_rows`` at a time (memory stays flat on big nights); inside a chunk
    ``Scorer.score_table`` batches wafers by padded size. ``run_ids`` become string columns (e.g.
    model_run_id, flow_run_id) so every prediction says where it came from.
    """
    if action not in ("full", "append"):
        raise ValueError(f"action must be 'full' or 'append', got {action!r}")
    device = resolve_device(cfg.train.device)
    scorer = registered_scorer(cfg, model_name, model_version, device=str(device))
    folder = partition_dir(curated_root, date)
    scored, per_part = [], {}
    for name in parts:
        table = read_parquet(f"{folder}/{name}").select(WAFER_COLUMNS)
        per_part[name] = table.num_rows
        for start in range(0, table.num_rows, chunk_rows):
            chunk = table.slice(start, chunk_rows)
            scored.append(scorer.score_table(chunk, model_name=model_name, model_version=str(model_version),
                                             device=device, extra=run_ids, num_threads=1))
    new = pa.concat_tables(scored) if scored else None
    dest = predictions_path(predictions_root, date)
    if action == "append" and file_exists(dest):
        fs, p = resolve_fs(dest)
        old = pq.read_table(p, filesystem=fs)
        if new is not None:
            keep = pc.invert(pc.is_in(old.column("wafer_id"), value_set=new.column("wafer_id")))
            new = pa.concat_tables([old.filter(keep), new], promote_options="permissive")
        else:
            new = old
    if new is None:
        raise ValueError(f"partition {date}: no part files to score")
    write_parquet_atomic(new, dest)
    get_run_logger().info("%s: scored %d wafers (%s), %d rows in %s", date, sum(per_part.values()), action,
                          new.num_rows, dest)
    return {"date": date, "output": dest if "://" in dest else os.path.abspath(dest), "rows": new.num_rows,
            "scored": sum(per_part.values()), "parts": per_part, "action": action}
