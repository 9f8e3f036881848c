"""The wafer table: one Parquet row per wafer (the data contract, see docs/data-contract.md).

This module owns the Arrow schema and the conversions between rows and numpy maps. Rules are
enforced by ``fcn_core.validate``; reading and atomic writing of Parquet live here too so every
stage of the pipeline touches files the same way.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fcn_core.atomic import atomic_write, temp_path

# die_map values
NO_DIE, PASS, FAIL = 0, 1, 2
MAX_SIDE = 1024

WAFER_SCHEMA = pa.schema(
    [
        pa.field("wafer_id", pa.string(), nullable=False),
        pa.field("lot_id", pa.string()),
        pa.field("captured_at", pa.timestamp("us", tz="UTC")),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("die_map", pa.binary(), nullable=False),
        pa.field("label_map", pa.binary()),
        pa.field("wafer_label", pa.string()),
    ]
)
WAFER_COLUMNS = WAFER_SCHEMA.names


class WaferTableError(ValueError):
    """The input cannot be read as a wafer table at all (missing file, not Parquet, no columns)."""


def make_table(
    *,
    wafer_ids: Sequence[str],
    die_maps: Sequence[np.ndarray],
    label_maps: Sequence[np.ndarray | None] | None = None,
    lot_ids: Sequence[str | None] | None = None,
    captured_at: Sequence[datetime | None] | None = None,
    wafer_labels: Sequence[str | None] | None = None,
) -> pa.Table:
    """Build a contract-conforming table from 2-D uint8 numpy maps."""
    n = len(wafer_ids)
    if len(die_maps) != n:
        raise ValueError("wafer_ids and die_maps differ in length")
    none = [None] * n
    heights = [int(m.shape[0]) for m in die_maps]
    widths = [int(m.shape[1]) for m in die_maps]
    label_bytes = (
        none
        if label_maps is None
        else [None if m is None else np.ascontiguousarray(m, dtype=np.uint8).tobytes() for m in label_maps]
    )
    return pa.table(
        {
            "wafer_id": pa.array(list(wafer_ids), pa.string()),
            "lot_id": pa.array(list(lot_ids) if lot_ids is not None else none, pa.string()),
            "captured_at": pa.array(list(captured_at) if captured_at is not None else none,
                                    pa.timestamp("us", tz="UTC")),
            "height": pa.array(heights, pa.int32()),
            "width": pa.array(widths, pa.int32()),
            "die_map": pa.array([np.ascontiguousarray(m, dtype=np.uint8).tobytes() for m in die_maps],
                                pa.binary()),
            "label_map": pa.array(label_bytes, pa.binary()),
            "wafer_label": pa.array(list(wafer_labels) if wafer_labels is not None else none, pa.string()),
        },
        schema=WAFER_SCHEMA,
    )


def _maps(table: pa.Table, column: str) -> list[np.ndarray | None]:
    heights = table.column("height").to_numpy()
    widths = table.column("width").to_numpy()
    out: list[np.ndarray | None] = []
    for blob, h, w in zip(table.column(column).to_pylist(), heights, widths):
        out.append(None if blob is None else np.frombuffer(blob, dtype=np.uint8).reshape(int(h), int(w)))
    return out


def die_maps(table: pa.Table) -> list[np.ndarray]:
    """(h, w) uint8 read-only views of each row's die_map (rows must be valid)."""
    return _maps(table, "die_map")  # type: ignore[return-value]


def label_maps(table: pa.Table) -> list[np.ndarray | None]:
    """(h, w) uint8 views of each row's label_map, None where the row has none."""
    return _maps(table, "label_map")


# -- files ---------------------------------------------------------------------------------------
def resolve_fs(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """A local path or any pyarrow filesystem URI (file://, s3://, gs://, ...) -> (fs, path)."""
    text = str(uri)
    if "://" in text:
        return pafs.FileSystem.from_uri(text)
    return pafs.LocalFileSystem(), str(Path(text).expanduser().resolve())


def list_parquet_files(source: str | os.PathLike) -> tuple[pafs.FileSystem, list[str]]:
    """A Parquet file or a folder of them (recursively) -> sorted file paths on that filesystem."""
    fs, path = resolve_fs(source)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise WaferTableError(f"{source}: no such file or folder")
    if info.type == pafs.FileType.File:
        return fs, [path]
    found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    files = sorted(f.path for f in found if f.type == pafs.FileType.File and f.path.endswith(".parquet")
                   and not Path(f.path).name.startswith((".", "_")))
    if not files:
        raise WaferTableError(f"{source}: folder holds no .parquet files")
    return fs, files


def read_parquet(source: str | os.PathLike) -> pa.Table:
    """Read one Parquet file (or a folder of them) as it is, no schema coercion.

    Raises WaferTableError with a readable message when the input cannot be read at all.
    """
    fs, files = list_parquet_files(source)
    tables = []
    for f in files:
        try:
            tables.append(pq.read_table(f, filesystem=fs))
        except Exception as exc:  # pyarrow raises several types for corrupt or non-Parquet files
            raise WaferTableError(_unreadable(f, exc)) from exc
    try:
        return pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    except pa.ArrowInvalid as exc:
        raise WaferTableError(f"{source}: files have incompatible schemas ({exc})") from exc


def _unreadable(path: str, exc: Exception) -> str:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    parent, _, name = path.rpartition("/")
    if parent.rpartition("/")[2].startswith("date=") and name.startswith("part-"):  # a curated store's part
        return (f"{path}: truncated or corrupt curated part file ({first}); delete it and ingest its source "
                "drop again (the manifest entry is then re-done)")
    return f"{path}: not a readable Parquet file ({first})"


def write_parquet_atomic(table: pa.Table, dest: str | os.PathLike) -> str:
    """Write to a temporary name beside ``dest`` then rename, so readers never see half a file."""
    return write_parquet_chunks_atomic([table], dest, schema=table.schema)


def write_parquet_chunks_atomic(chunks: Iterable[pa.Table], dest: str | os.PathLike, *,
                                schema: pa.Schema | None = None) -> str:
    """Stream tables into one Parquet file under a temporary name, then rename it into place.

    ``schema``: of the file (default: the first chunk's; later chunks are cast to it). With no
    chunks and no schema there is nothing to write: ValueError. Local paths go through
    ``fcn_core.atomic.atomic_write`` (fsync, rename); other filesystems write a temporary object
    and move it. A handled error leaves no temporary file.
    """
    fs, path = resolve_fs(dest)
    if isinstance(fs, pafs.LocalFileSystem):
        try:
            with atomic_write(path) as tmp:
                _write_chunks(chunks, str(tmp), pafs.LocalFileSystem(), schema)
        except IsADirectoryError as exc:
            raise WaferTableError(f"{dest}: is a folder; give a file name for the output") from exc
        return path
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    tmp = f"{parent}/{temp_path(path.rsplit('/', 1)[1]).name}"
    try:
        _write_chunks(chunks, tmp, fs, schema)
        fs.move(tmp, path)
    except BaseException:
        if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
            fs.delete_file(tmp)
        raise
    return path


def _write_chunks(chunks: Iterable[pa.Table], path: str, fs: pafs.FileSystem, schema: pa.Schema | None) -> None:
    writer = None
    with fs.open_output_stream(path) as sink:
        try:
            for chunk in chunks:
                if writer is None:
                    writer = pq.ParquetWriter(sink, schema or chunk.schema, compression="zstd")
                writer.write_table(chunk.cast(writer.schema))
            if writer is None:
                if schema is None:
                    raise ValueError("nothing to write: no tables and no schema")
                writer = pq.ParquetWriter(sink, schema, compression="zstd")
        finally:
            if writer is not None:
                writer.close()


def concat(tables: Iterable[pa.Table]) -> pa.Table:
    tables = list(tables)
    if not tables:
        return WAFER_SCHEMA.empty_table()
    return pa.concat_tables(tables, promote_options="permissive")
