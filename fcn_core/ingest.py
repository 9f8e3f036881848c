"""Turn wafer-table drops into the curated dataset (layout in docs/data-contract.md).

    <curated_root>/
        _manifest.json                      source content hashes already ingested
        date=YYYY-MM-DD/part-<hash>.parquet good rows: WAFER_SCHEMA + split
        _quarantine/<hash>.parquet          bad rows as they came + reason

``<hash>`` is the blake2b hash of the source file's bytes, so re-ingesting a file is a no-op
(skipped via the manifest) and a re-run after a crash rewrites the same part files instead of
adding copies. Every file is written to a temporary name and renamed; the manifest is updated
after each source file, last, so an interrupted ingest resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fcn_core.atomic import clean_stale_temps, temp_path, write_bytes_atomic
from fcn_core.config import SplitConfig
from fcn_core.table import WAFER_SCHEMA, WaferTableError, list_parquet_files, resolve_fs, write_parquet_atomic
from fcn_core.validate import validate_table

SPLITS: tuple[str, ...] = ("train", "val", "test")
CURATED_SCHEMA = WAFER_SCHEMA.append(pa.field("split", pa.string(), nullable=False))
READ_SCHEMA = CURATED_SCHEMA.append(pa.field("date", pa.string(), nullable=False))
MANIFEST_NAME = "_manifest.json"
QUARANTINE_DIR = "_quarantine"
_PARTITION_PREFIX = "date="
_MICROS_PER_DAY = 86_400_000_000


@dataclass
class IngestReport:
    files_ingested: list[str] = field(default_factory=list)
    files_skipped: list[str] = field(default_factory=list)  # content already ingested
    files_failed: dict[str, str] = field(default_factory=dict)  # unreadable file -> why; retried next run
    rows_valid: int = 0
    rows_quarantined: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # quarantine reason -> rows
    partitions: list[str] = field(default_factory=list)  # dates written by this run, sorted

    def to_dict(self) -> dict:
        return asdict(self)


# -- splits --------------------------------------------------------------------------------------
def assign_splits(table: pa.Table, split: SplitConfig) -> pa.Array:
    """Deterministic train/val/test per row: hash of salt + lot_id (wafer_id when no lot).

    All wafers of a lot share one split, in every ingest, whatever else is in the batch.
    """
    if "wafer_id" not in table.column_names:
        raise ValueError("assign_splits needs a wafer_id column")
    wafer = table.column("wafer_id").cast(pa.string())
    keys = pc.binary_join_element_wise("wafer:", wafer, "")
    if "lot_id" in table.column_names:
        lot = table.column("lot_id").cast(pa.string())
        has_lot = pc.fill_null(pc.not_equal(pc.utf8_trim_whitespace(lot), ""), False)
        keys = pc.if_else(has_lot, pc.binary_join_element_wise("lot:", lot, ""), keys)
    unique, inverse = np.unique(keys.to_numpy(zero_copy_only=False).astype(str), return_inverse=True)
    u = np.array([_unit_hash(split.salt, k) for k in unique], dtype=np.float64)
    bucket = np.searchsorted(np.cumsum([split.train, split.val]), u, side="right")
    return pa.array(np.asarray(SPLITS, dtype=object)[bucket[inverse]], pa.string())


def _unit_hash(salt: str, key: str) -> float:
    digest = hashlib.blake2b(f"{salt}\x1f{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


# -- ingest ----------------------------------------------------------------------------------------
def ingest(
    sources: str | os.PathLike | list[str | os.PathLike],
    curated_root: str | os.PathLike,
    *,
    n_classes: int,
    split: SplitConfig,
    now: datetime | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> IngestReport:
    """Validate each Parquet file of ``sources`` and add it to the curated store at ``curated_root``.

    Sources are files or folders, local paths or pyarrow filesystem URIs. Wafer ids already in
    the store (or accepted earlier in this run) are duplicates. Rows with a null ``captured_at``
    go to the partition of ``now`` (default: the current UTC time). A missing source raises
    WaferTableError before anything is written; an unreadable file is reported in
    ``files_failed`` and the others go on. ``progress(done, total, file)`` is called after each file.
    """
    # List every source first: a missing one fails the call before anything is written.
    files: list[tuple[pafs.FileSystem, str, str]] = []
    for src in [sources] if isinstance(sources, (str, os.PathLike)) else sources:
        fs, paths = list_parquet_files(src)
        files.extend((fs, path, _display(src, path)) for path in paths)

    store = _Store(str(curated_root), now=_as_utc(now or datetime.now(timezone.utc)),
                   n_classes=n_classes, split=split)
    report = IngestReport()
    for done, (fs, path, name) in enumerate(files, start=1):
        store.add_file(fs, path, name, report)
        if progress is not None:
            progress(done, len(files), name)
    report.partitions = sorted(store.written)
    return report


class _Store:
    """The curated store during one ingest call: manifest, known ids, what this call wrote."""

    def __init__(self, root: str, *, now: datetime, n_classes: int, split: SplitConfig) -> None:
        self.root, self.now, self.n_classes, self.split = root, now, n_classes, split
        self.fs, self.path = resolve_fs(root)
        if isinstance(self.fs, pafs.LocalFileSystem):
            _clean_temps(self.path)  # left by a writer killed mid-file
        self.manifest = _read_manifest(self.fs, self.path)
        self.known, self.ids_by_hash, self.parts_by_hash = _store_index(self.fs, self.path)
        self.written: set[str] = set()

    def add_file(self, fs: pafs.FileSystem, path: str, name: str, report: IngestReport) -> None:
        try:
            with fs.open_input_file(path) as f:
                data = f.read_buffer()
        except OSError as exc:
            report.files_failed[name] = f"cannot read file ({exc})"
            return
        digest = hashlib.blake2b(memoryview(data), digest_size=16).hexdigest()
        if self._done(digest):
            report.files_skipped.append(name)
            return
        try:
            table = pq.read_table(pa.BufferReader(data))
        except (pa.ArrowException, OSError) as exc:
            report.files_failed[name] = f"not a readable Parquet file ({exc})"
            return
        # A re-run after a crash must not see its own earlier part files as duplicates.
        known = self.known - self.ids_by_hash[digest] if digest in self.ids_by_hash else self.known
        try:
            result = validate_table(table, n_classes=self.n_classes, known_ids=known)
        except WaferTableError as exc:
            report.files_failed[name] = str(exc)
            return

        parts = self._write_parts(result.valid, digest)
        quarantine = f"{QUARANTINE_DIR}/{digest}.parquet"
        if result.quarantine.num_rows:
            write_parquet_atomic(result.quarantine, _join(self.root, quarantine))
        elif self.fs.get_file_info(f"{self.path}/{quarantine}").type == pafs.FileType.File:
            self.fs.delete_file(f"{self.path}/{quarantine}")  # left by an interrupted run

        self.known |= set(result.valid.column("wafer_id").to_pylist())
        self.manifest["sources"][digest] = {
            "source": name,
            "ingested_at": self.now.isoformat(),
            "rows_valid": result.n_valid,
            "rows_quarantined": result.n_quarantined,
            "counts": result.counts,
            "parts": parts,
        }
        _write_manifest(self.fs, self.path, self.manifest)  # last: the file counts as done from here
        report.files_ingested.append(name)
        report.rows_valid += result.n_valid
        report.rows_quarantined += result.n_quarantined
        for reason, k in result.counts.items():
            report.counts[reason] = report.counts.get(reason, 0) + k

    def _done(self, digest: str) -> bool:
        """In the manifest with every part file still there (a deleted, corrupt part is re-done)."""
        entry = self.manifest["sources"].get(digest)
        return entry is not None and all(
            self.fs.get_file_info(f"{self.path}/{part}").type == pafs.FileType.File for part in entry.get("parts", []))

    def _write_parts(self, valid: pa.Table, digest: str) -> list[str]:
        """One part file per capture date; returns their paths relative to the root."""
        dates = _partition_dates(valid, self.now)
        curated = pa.Table.from_arrays([*valid.columns, assign_splits(valid, self.split)], schema=CURATED_SCHEMA)
        parts = []
        for day in sorted(set(dates.tolist())):
            part = f"{_PARTITION_PREFIX}{day}/part-{digest}.parquet"
            write_parquet_atomic(curated.filter(pa.array(dates == day)), _join(self.root, part))
            parts.append(part)
            self.written.add(day)
        for stale in set(self.parts_by_hash.get(digest, [])) - set(parts):  # left by an interrupted run
            self.fs.delete_file(f"{self.path}/{stale}")
        return parts


# -- reading the store ---------------------------------------------------------------------------
def list_partitions(curated_root: str | os.PathLike) -> list[str]:
    """Sorted capture dates ('YYYY-MM-DD') that hold curated wafers."""
    return _partitions(*resolve_fs(str(curated_root)))


def read_curated(
    curated_root: str | os.PathLike,
    *,
    splits: list[str] | tuple[str, ...] | None = None,
    dates: list[str] | tuple[str, ...] | None = None,
) -> pa.Table:
    """The curated wafers (WAFER_SCHEMA + split + date), optionally only some splits / dates."""
    if splits is not None and (unknown := set(splits) - set(SPLITS)):
        raise ValueError(f"unknown split(s) {sorted(unknown)}; expected some of {list(SPLITS)}")
    fs, root = resolve_fs(str(curated_root))
    wanted = _partitions(fs, root)
    if dates is not None:
        wanted = [d for d in wanted if d in {str(x) for x in dates}]
    files = [path for day in wanted for path in _part_files(fs, f"{root}/{_PARTITION_PREFIX}{day}")]
    if not files:
        return READ_SCHEMA.empty_table()
    # Files listed explicitly (sorted by date, then part): the same rows in the same order every read.
    dataset = ds.dataset(files, schema=READ_SCHEMA, format="parquet", filesystem=fs, partition_base_dir=root,
                         partitioning=ds.partitioning(pa.schema([READ_SCHEMA.field("date")]), flavor="hive"))
    where = None if splits is None else pc.field("split").isin(list(splits))
    try:
        table = dataset.to_table(filter=where)
    except (pa.ArrowException, OSError) as exc:
        raise WaferTableError(_unreadable_part(fs, files, exc)) from exc
    return table.cast(READ_SCHEMA)


# -- helpers -------------------------------------------------------------------------------------
def _as_utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def _display(source: str | os.PathLike, path: str) -> str:
    """How a file is named in reports: keep the scheme of URI sources."""
    text = str(source)
    return f"{text.split('://', 1)[0]}://{path}" if "://" in text else path


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts]) if "://" in root else os.path.join(root, *parts)


def _partition_dates(valid: pa.Table, now: datetime) -> np.ndarray:
    """'YYYY-MM-DD' per row: the UTC date of captured_at, of ``now`` when null."""
    micros = pc.fill_null(valid.column("captured_at").cast(pa.int64()), -1).to_numpy()
    days = (micros // _MICROS_PER_DAY).astype("datetime64[D]").astype(str)
    is_null = np.asarray(valid.column("captured_at").is_null())
    return np.where(is_null, now.date().isoformat(), days).astype(str)


def _partitions(fs: pafs.FileSystem, root: str) -> list[str]:
    """Dates whose partition folder holds at least one part file (empty folders do not count)."""
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    days = set()
    for entry in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        folder, _, name = entry.path[len(root):].strip("/").rpartition("/")
        if (entry.type == pafs.FileType.File and folder.startswith(_PARTITION_PREFIX) and "/" not in folder
                and name.startswith("part-") and name.endswith(".parquet")):
            days.add(folder[len(_PARTITION_PREFIX):])
    return sorted(days)


def _part_files(fs: pafs.FileSystem, folder: str) -> list[str]:
    entries = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    return sorted(e.path for e in entries if e.type == pafs.FileType.File
                  and e.base_name.startswith("part-") and e.base_name.endswith(".parquet"))


def _store_index(fs: pafs.FileSystem, root: str) -> tuple[set[str], dict[str, set[str]], dict[str, list[str]]]:
    """Ids already curated: all of them, per source hash, and each hash's part files (relative)."""
    known: set[str] = set()
    ids_by_hash: dict[str, set[str]] = {}
    parts_by_hash: dict[str, list[str]] = {}
    for day in _partitions(fs, root):
        for path in _part_files(fs, f"{root}/{_PARTITION_PREFIX}{day}"):
            digest = path.rsplit("/", 1)[1][len("part-"):-len(".parquet")]
            try:
                ids = set(pq.read_table(path, filesystem=fs, columns=["wafer_id"]).column(0).to_pylist())
            except (pa.ArrowException, OSError) as exc:
                raise WaferTableError(corrupt_part_message(path, exc)) from exc
            known |= ids
            ids_by_hash.setdefault(digest, set()).update(ids)
            parts_by_hash.setdefault(digest, []).append(f"{_PARTITION_PREFIX}{day}/part-{digest}.parquet")
    return known, ids_by_hash, parts_by_hash


def _read_manifest(fs: pafs.FileSystem, root: str) -> dict:
    path = f"{root}/{MANIFEST_NAME}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return {"version": 1, "sources": {}}
    with fs.open_input_stream(path) as f:
        text = f.read()
    try:
        manifest = json.loads(text.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WaferTableError(f"{path}: corrupt ingest manifest ({exc}); move it away and ingest the drops again "
                              "(curated parts are rewritten in place, not duplicated)") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("sources"), dict):
        raise WaferTableError(f"{path}: not a wafer-fcn ingest manifest; move it away and ingest the drops again "
                              "(curated parts are rewritten in place, not duplicated)")
    return manifest


def _clean_temps(root: str) -> None:
    for folder in [root, f"{root}/{QUARANTINE_DIR}",
                   *(e.path for e in os.scandir(root) if e.is_dir() and e.name.startswith(_PARTITION_PREFIX))
                   ] if os.path.isdir(root) else []:
        clean_stale_temps(folder)


def _unreadable_part(fs: pafs.FileSystem, files: list[str], exc: Exception) -> str:
    """Name the part file that cannot be read (the dataset error may not say which)."""
    for path in files:
        try:
            pq.ParquetFile(path, filesystem=fs).metadata  # noqa: B018 - reading the footer is the check
        except (pa.ArrowException, OSError) as bad:
            return corrupt_part_message(path, bad)
    return f"curated store: cannot read its part files ({_first_line(exc)})"


def corrupt_part_message(path: str, exc: BaseException) -> str:
    return (f"{path}: truncated or corrupt curated part file ({_first_line(exc)}); delete it and ingest its "
            "source drop again (the manifest entry is then re-done)")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _write_manifest(fs: pafs.FileSystem, root: str, manifest: dict) -> None:
    data = json.dumps(manifest, indent=1, sort_keys=True).encode()
    if isinstance(fs, pafs.LocalFileSystem):
        write_bytes_atomic(f"{root}/{MANIFEST_NAME}", data)
        return
    fs.create_dir(root, recursive=True)
    tmp = f"{root}/{temp_path(MANIFEST_NAME).name}"
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, f"{root}/{MANIFEST_NAME}")
    except BaseException:
        if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
            fs.delete_file(tmp)
        raise
