"""Data tasks: synthesise a drop, ingest files, gate on quarantine, snapshot the training splits.

Tasks take and return paths, hashes and small dicts. Ingest is cached on the file's *content*
hash (plus the task's source and the other inputs): re-running the flow over unchanged drops does
not even open the curated store. Only ingest retries: it reads drops that may sit on an object
store, and ``fcn_core.ingest`` is idempotent, so a retry after a partial write is safe.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from prefect import get_run_logger, task
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE

from fcn_core.config import Config, SplitConfig
from fcn_core.ingest import SPLITS, ingest, read_curated
from fcn_core.padding import padded_shape
from fcn_core.table import WAFER_COLUMNS, list_parquet_files, write_parquet_atomic

_HASH_CHUNK = 1 << 20


class IngestFileError(RuntimeError):
    """A drop file could not be ingested (unreadable, not a wafer table); it is retried next run."""


class DataQualityError(RuntimeError):
    """Too much of this run's data was quarantined, or no usable data is left to train on."""


def content_hash(path: str) -> str:
    """blake2b-128 of a file's bytes (local path or pyarrow URI): the same digest ingest uses."""
    fs, files = list_parquet_files(path)
    digest = hashlib.blake2b(digest_size=16)
    with fs.open_input_stream(files[0]) as stream:
        while chunk := stream.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def drop_files(source: str) -> list[str]:
    """The Parquet files of a drop source (file, folder or URI), as paths or URIs ingest accepts."""
    fs, files = list_parquet_files(source)
    if "://" in str(source):
        scheme = str(source).split("://", 1)[0]
        return [f"{scheme}://{f}" for f in files]
    return files


@task(name="synthesise-drop", cache_policy=NO_CACHE)
def synthesise_drop(*, cfg: Config, drops_dir: str) -> str:
    """Write ``data.synth.n_wafers`` generated wafers as one drop file; reuse it when it already exists.

    The generator is deterministic in its settings (data.synth and the classes), so the file is
    named after them.
    """
    from fcn_core.synth import generate_wafers  # lazy: only this task needs the generator

    settings, specs = cfg.data.synth, cfg.classes
    classes = [c.model_dump(mode="json") for c in specs]
    key = hashlib.sha256(json.dumps([settings.model_dump(mode="json"), classes], sort_keys=True).encode())
    dest = Path(drops_dir) / f"synth-seed{settings.seed}-n{settings.n_wafers}-{key.hexdigest()[:12]}.parquet"
    if dest.exists():
        get_run_logger().info("reusing synthetic drop %s", dest)
        return str(dest)
    table = generate_wafers(settings.n_wafers, seed=settings.seed, synth=settings, classes=specs)
    write_parquet_atomic(table, dest)
    get_run_logger().info("synthesised %d wafers into %s", table.num_rows, dest)
    return str(dest)


@task(name="ingest-file", task_run_name="ingest-{content_digest:.12}",
      cache_policy=(INPUTS - "path") + TASK_SOURCE, retries=2, retry_delay_seconds=5)
def ingest_file(*, path: str, content_digest: str, curated_root: str, n_classes: int, split: dict) -> dict:
    """Validate one drop file into the curated store; bad rows go to its quarantine.

    The cache key is the content digest, not the path: a renamed or re-copied file with the same
    bytes is not ingested twice. A file that cannot be read raises (so it is retried now, and not
    cached as done), and the flow reports it without stopping the other files.
    """
    report = ingest([path], curated_root, n_classes=n_classes, split=SplitConfig.model_validate(split))
    if report.files_failed:
        raise IngestFileError("; ".join(f"{name}: {why}" for name, why in report.files_failed.items()))
    get_run_logger().info("%s: %d valid, %d quarantined %s", path, report.rows_valid, report.rows_quarantined,
                          report.counts or "")
    return {"path": path, "content_digest": content_digest, **report.to_dict()}


@task(name="check-quarantine", cache_policy=NO_CACHE)
def check_quarantine(reports: list[dict], *, max_quarantined_share: float) -> dict:
    """Data-quality gate over this run's ingests: fail the run when too many rows were quarantined.

    Files ingested earlier (skipped now) count with their rows of that time: they are in the store.
    """
    valid = sum(r["rows_valid"] for r in reports)
    quarantined = sum(r["rows_quarantined"] for r in reports)
    reasons: dict[str, int] = {}
    for r in reports:
        for reason, k in r["counts"].items():
            reasons[reason] = reasons.get(reason, 0) + k
    share = quarantined / (valid + quarantined) if valid + quarantined else 0.0
    summary = {"rows_valid": valid, "rows_quarantined": quarantined, "quarantined_share": share, "reasons": reasons}
    if share > max_quarantined_share:
        raise DataQualityError(
            f"{quarantined} of {valid + quarantined} ingested rows ({share:.1%}) were quarantined, above the "
            f"limit of {max_quarantined_share:.1%}; reasons: {reasons}. Fix the drops or raise max_quarantined_share."
        )
    return summary


@task(name="preprocess-split", cache_policy=NO_CACHE)
def snapshot_splits(*, curated_root: str, out_dir: str, pad_multiple: int, pad_fixed: int | None) -> dict:
    """Freeze this run's labelled train/val/test wafers as Parquet files (the run's data snapshot).

    Later nights keep landing in the curated store; training, evaluation and the registry's
    re-scoring all read these files, so a run is reproducible from its own folder. Unlabelled
    (production) wafers are left out. Padding happens per batch, by size bucket; the padded
    shapes the buckets will use are reported here.
    """
    out: dict = {"paths": {}, "counts": {}, "padded_shapes": {}, "max_side": 0}
    for split in SPLITS:
        table = read_curated(curated_root, splits=[split])
        table = table.filter(pc.is_valid(table.column("label_map"))).select(WAFER_COLUMNS)
        if table.num_rows == 0:
            raise DataQualityError(
                f"the curated store {curated_root} has no labelled wafers in the {split!r} split; "
                "training needs train, val and test wafers (ingest more data or change data.split)"
            )
        dest = os.path.join(out_dir, f"{split}.parquet")
        write_parquet_atomic(table, dest)
        heights, widths = (table.column(c).to_numpy() for c in ("height", "width"))
        shapes = {padded_shape(int(h), int(w), multiple=pad_multiple, fixed=pad_fixed)
                  for h, w in set(zip(heights.tolist(), widths.tolist()))}
        out["paths"][split] = dest
        out["counts"][split] = table.num_rows
        out["padded_shapes"][split] = len(shapes)
        out["max_side"] = max(out["max_side"], int(np.max(np.maximum(heights, widths))))
    get_run_logger().info("snapshot: %s wafers (train/val/test), %s padded shapes", out["counts"], out["padded_shapes"])
    return out


@task(name="synthesise-night", cache_policy=NO_CACHE)
def synthesise_night(*, cfg: Config, date: str, n_wafers: int, drops_dir: str) -> str:
    """Write one new night of ``n_wafers`` generated wafers, captured on ``date``, as a drop file
    ``night-<date>.parquet`` (wafer ids ``night-<date>-NNNNN``); the demo's production night.

    Seeded apart from the training wafers (data.synth.seed + 7919), so the night is new to the model.
    """
    import pyarrow as pa
    from datetime import date as Date

    from fcn_core.synth import generate_wafers  # lazy: only the synthesising tasks need the generator

    one_night = cfg.data.synth.model_copy(update={"nights": 1})
    night = generate_wafers(n_wafers, seed=cfg.data.synth.seed + 7919, synth=one_night, classes=cfg.classes,
                            start_date=Date.fromisoformat(date))
    night = night.set_column(0, "wafer_id", pa.array([f"night-{date}-{i:05d}" for i in range(night.num_rows)]))
    dest = write_parquet_atomic(night, Path(drops_dir) / f"night-{date}.parquet")
    get_run_logger().info("synthesised tonight's drop: %d wafers into %s", night.num_rows, dest)
    return str(dest)
