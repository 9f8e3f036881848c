"""The score_partition task of nightly-inference: one curated date partition -> one predictions file.

Output: ``<predictions_root>/date=YYYY-MM-DD/predictions.parquet``, written atomically. With
``action="append"`` only the partition's new part files are scored and added to the existing
file, so no wafer is scored twice. The model is named by registry name and version (never passed
as an object); each process loads it once and shares it between its task threads.
"""

from __future__ import annotations

import os
import threading

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
import torch
from torch import nn

from fcn_core.config import config_from_dict
from fcn_core.predict import prepare_model, resolve_device, score_table
from fcn_core.table import WAFER_COLUMNS, read_parquet, resolve_fs, write_parquet_atomic

PREDICTIONS_FILE = "predictions.parquet"
PARTITION_PREFIX = "date="

_models: dict[tuple[str, str, str], nn.Module] = {}
_models_lock = threading.Lock()


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


def remember_model(tracking_uri: str, name: str, version: str, model: nn.Module) -> None:
    """Seed this process's model cache (the flow already loaded the champion to check it exists)."""
    with _models_lock:
        _models[(tracking_uri, name, str(version))] = _shareable(model)


def registered_model(tracking_uri: str, name: str, version: str, *, device: str = "cpu") -> nn.Module:
    """``models:/name/version`` from this process's cache, loading it on first use."""
    key = (tracking_uri, name, str(version))
    with _models_lock:  # held while loading: concurrent tasks wait for one load, not N
        if key not in _models:
            from tracking.registry import load_scorer_uri

            scorer, _, _ = load_scorer_uri(f"models:/{name}/{version}", tracking_uri=tracking_uri, device=device)
            _models[key] = _shareable(scorer.model)
        return _models[key]


def _shareable(model: nn.Module) -> nn.Module:
    """Eval mode and channels-last weights, set once before tasks share the model.

    ``score_table`` would convert the weights in place on first use; two tasks doing that at once
    let one run a batch with half-converted weights, which takes other kernels and, under bf16,
    rounds differently: near-tied dies then get other labels than in a sequential run.
    """
    with torch.no_grad():
        return prepare_model(model, channels_last=True, subpixel=False)


@task(name="score-partition", task_run_name="score-{date}", cache_policy=NO_CACHE, retries=1,
      retry_delay_seconds=10)
def score_partition(*, config: dict, date: str, curated_root: str, parts: list[str], action: str,
                    predictions_root: str, model_name: str, model_version: str, run_ids: dict[str, str],
                    chunk_rows: int = 20_000) -> dict:
    """Score ``parts`` of one date partition and write its predictions file; returns what was written.

    ``action``: "full" rewrites the file from these parts; "append" adds them to the existing file.
    Rows are scored ``chunk_rows`` at a time (memory stays flat on big nights); inside a chunk
    ``score_table`` batches wafers by padded size. ``run_ids`` become string columns (e.g.
    model_run_id, flow_run_id) so every prediction says where it came from.
    """
    if action not in ("full", "append"):
        raise ValueError(f"action must be 'full' or 'append', got {action!r}")
    cfg = config_from_dict(config)
    device = resolve_device(cfg.train.device)
    model = registered_model(cfg.tracking_uri, model_name, model_version, device=str(device))
    folder = partition_dir(curated_root, date)
    scored, per_part = [], {}
    for name in parts:
        table = read_parquet(f"{folder}/{name}").select(WAFER_COLUMNS)
        per_part[name] = table.num_rows
        for start in range(0, table.num_rows, chunk_rows):
            chunk = table.slice(start, chunk_rows)
            scored.append(score_table(model, chunk, cfg=cfg, model_name=model_name, model_version=str(model_version),
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
