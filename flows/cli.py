"""The ``wafer-fcn`` command line.

Every command takes the configuration the same way: a global ``--config/-c`` (name in configs/ or
a YAML path) and repeatable ``--set key.path=value`` overrides, given before the command or on the
command itself (``wafer-fcn -c tiny synth ...`` or ``wafer-fcn synth ... -c tiny``). New commands
take ``ctx: typer.Context`` plus ``config: ConfigOption = None, overrides: SetOption = None`` and
call ``command_config(ctx, config, overrides)``; errors the user can fix go through ``fail``
(one line on stderr, exit code 1, no traceback).

Heavy modules (synth, torch-based code) are imported inside the commands so ``--help`` stays fast.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, NoReturn

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fcn_core.config import Config, load_config
from fcn_core.table import WaferTableError, read_parquet, resolve_fs, write_parquet_atomic

app = typer.Typer(
    help="wafer-fcn: per-die defect-pattern segmentation of wafer maps with FCNs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="markdown",  # docstring paragraphs are reflowed to the terminal width
)
console = Console()

SYNTH_CHUNK = 5_000  # wafers per generated chunk (progress bar steps, bounded memory)

# -- shared option handling ------------------------------------------------------------------------
ConfigOption = Annotated[
    str | None,
    typer.Option("--config", "-c", help="Config name in configs/ (e.g. default, tiny) or a YAML path.",
                 show_default=False),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config value, e.g. --set train.fcn8s.epochs=2 (repeatable).",
                 show_default=False),
]


@dataclass
class CliState:
    """Global options, kept on the click context for the commands."""

    config: str = "default"
    overrides: list[str] = field(default_factory=list)


@app.callback()
def main(ctx: typer.Context, config: ConfigOption = None, overrides: SetOption = None) -> None:
    """Generate, validate, ingest and look at wafer maps; train and run FCN-32s/16s/8s."""
    ctx.obj = CliState(config=config or "default", overrides=list(overrides or []))


def fail(message: str, *, code: int = 1) -> NoReturn:
    """Stop with a one-line message on stderr (no traceback)."""
    typer.echo(f"error: {' '.join(str(message).split())}", err=True)
    raise typer.Exit(code)


def command_config(ctx: typer.Context, config: str | None = None, overrides: list[str] | None = None) -> Config:
    """The config of this invocation: the command's -c/--set win over the global ones."""
    state = ctx.find_object(CliState) or CliState()
    name = config or state.config
    try:
        return load_config(name, [*state.overrides, *(overrides or [])])
    except FileNotFoundError as exc:
        fail(str(exc))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        fail(f"config {name!r}: {problems}")
    except ValueError as exc:  # a malformed --set
        fail(f"config {name!r}: {exc}")


def read_wafer_table(source: str) -> pa.Table:
    try:
        return read_parquet(source)
    except WaferTableError as exc:
        fail(str(exc))


def join_path(folder: str | os.PathLike, name: str) -> str:
    """``folder/name`` for local folders and pyarrow URIs alike."""
    text = str(folder)
    return f"{text.rstrip('/')}/{name}" if "://" in text else os.path.join(text, name)


def counts_table(title: str, counts: dict[str, int], *, every: Iterable[str] = ()) -> Table:
    """A two-column rich table; names in ``every`` are listed even with a zero count."""
    table = Table(title=title, title_justify="left")
    table.add_column("reason")
    table.add_column("rows", justify="right")
    for name in [*every, *(k for k in counts if k not in set(every))]:
        k = counts.get(name, 0)
        table.add_row(name if k else f"[dim]{name}[/dim]", f"{k:,}" if k else "[dim]0[/dim]")
    return table


# -- synth -----------------------------------------------------------------------------------------
@app.command()
def synth(
    ctx: typer.Context,
    out: Annotated[str, typer.Argument(metavar="OUT.parquet",
                                       help="Parquet file to write (local path or pyarrow URI).")],
    n: Annotated[int | None, typer.Option("--n", "-n", min=1, show_default=False,
                                          help="Number of wafers [default: data.synth.n_wafers].")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed [default: data.synth.seed].",
                                             show_default=False)] = None,
    config: ConfigOption = None,
    overrides: SetOption = None,
) -> None:
    """Write a labelled synthetic wafer table (die maps + per-die pattern labels).

    The generator's knobs (sizes, lots, nights, pattern mix) come from the config's data.synth.
    """
    cfg = command_config(ctx, config, overrides)
    try:
        from fcn_core import synth as generator
    except ImportError as exc:
        fail(f"the synthetic wafer generator is not available ({exc})")
    n = cfg.data.synth.n_wafers if n is None else n
    seed = cfg.data.synth.seed if seed is None else seed

    if n > SYNTH_CHUNK and hasattr(generator, "iter_wafer_chunks"):
        chunks = generator.iter_wafer_chunks(n, SYNTH_CHUNK, seed=seed, synth=cfg.data.synth, classes=cfg.classes)
        with _progress() as progress:
            task = progress.add_task("generating wafers", total=n)
            path = write_chunks_atomic(_advancing(chunks, progress, task), out)
    else:
        with console.status(f"generating {n:,} wafers"):
            table = generator.generate_wafers(n, seed=seed, synth=cfg.data.synth, classes=cfg.classes)
            path = write_parquet_atomic(table, out)
    console.print(f"wrote {n:,} wafers to {path}")


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


def _advancing(chunks: Iterable[pa.Table], progress: Progress, task) -> Iterator[pa.Table]:
    for chunk in chunks:
        yield chunk
        progress.advance(task, chunk.num_rows)


def write_chunks_atomic(chunks: Iterable[pa.Table], dest: str | os.PathLike) -> str:
    """Stream tables into one Parquet file under a temporary name, then rename it into place."""
    fs, path = resolve_fs(dest)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}.parquet"
    writer = None
    try:
        with fs.open_output_stream(tmp) as sink:
            for chunk in chunks:
                if writer is None:
                    writer = pq.ParquetWriter(sink, chunk.schema, compression="zstd")
                writer.write_table(chunk.cast(writer.schema))
            if writer is None:
                raise ValueError("no wafers generated")
            writer.close()
    except BaseException:
        if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
            fs.delete_file(tmp)
        raise
    fs.move(tmp, path)
    return path


# -- validate --------------------------------------------------------------------------------------
@app.command()
def validate(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(metavar="IN.parquet",
                                          help="Wafer table: Parquet file or folder, local or pyarrow URI.")],
    out_dir: Annotated[str, typer.Option("--out-dir", "-o",
                                         help="Folder for valid.parquet and quarantine.parquet.")],
    config: ConfigOption = None,
    overrides: SetOption = None,
) -> None:
    """Check every data-contract rule per row (docs/data-contract.md).

    Writes OUT_DIR/valid.parquet (good rows, unchanged) and OUT_DIR/quarantine.parquet (bad rows as
    they came plus a 'reason' column) and prints the rows per reason. Exits 0 when it finished, even
    with bad rows (they are data); exits 1 when the input cannot be read as a wafer table at all.
    """
    from fcn_core.validate import REASONS, validate_table

    cfg = command_config(ctx, config, overrides)
    table = read_wafer_table(source)
    try:
        result = validate_table(table, n_classes=cfg.n_classes)
    except WaferTableError as exc:
        fail(f"{source}: {exc}")
    write_parquet_atomic(result.valid, join_path(out_dir, "valid.parquet"))
    write_parquet_atomic(result.quarantine, join_path(out_dir, "quarantine.parquet"))
    console.print(counts_table("quarantined rows per rule", result.counts, every=REASONS))
    console.print(f"valid {result.n_valid:,}  quarantined {result.n_quarantined:,}  ->  {out_dir}")


# -- ingest ----------------------------------------------------------------------------------------
@app.command("ingest")
def ingest_command(
    ctx: typer.Context,
    sources: Annotated[list[str], typer.Argument(metavar="SRC...",
                                                 help="Parquet files or folders (local paths or pyarrow URIs).")],
    curated: Annotated[str | None, typer.Option("--curated", help="Curated store [default: <home>/curated].",
                                                show_default=False)] = None,
    config: ConfigOption = None,
    overrides: SetOption = None,
) -> None:
    """Validate drops and add them to the curated store, partitioned by capture date.

    Re-ingesting a file already ingested (same content) is skipped. Bad rows go to the store's
    _quarantine/ folder. Exits 1 if a file could not be read (the others are still ingested).
    """
    from fcn_core.ingest import ingest

    cfg = command_config(ctx, config, overrides)
    root = curated or str(cfg.home_dir / "curated")
    try:
        with _progress() as progress:
            task = progress.add_task("ingesting files", total=None)
            report = ingest(sources, root, n_classes=cfg.n_classes, split=cfg.data.split,
                            progress=lambda done, total, _: progress.update(task, completed=done, total=total))
    except WaferTableError as exc:
        fail(str(exc))
    summary = Table(title=f"ingest into {root}", title_justify="left", show_header=False)
    summary.add_column("what")
    summary.add_column("value", justify="right")
    for label, value in [("files ingested", len(report.files_ingested)),
                         ("files skipped (already ingested)", len(report.files_skipped)),
                         ("files unreadable", len(report.files_failed)),
                         ("rows valid", report.rows_valid), ("rows quarantined", report.rows_quarantined)]:
        summary.add_row(label, f"{value:,}")
    summary.add_row("partitions written", ", ".join(report.partitions) or "-")
    console.print(summary)
    if report.counts:
        console.print(counts_table("quarantined rows per rule", report.counts))
    for name, why in report.files_failed.items():
        typer.echo(f"unreadable: {name}: {why}", err=True)
    if report.files_failed:
        fail(f"{len(report.files_failed)} file(s) could not be read; fix them and run ingest again")


# -- show ------------------------------------------------------------------------------------------
@app.command()
def show(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(metavar="IN.parquet",
                                          help="Wafer table: Parquet file or folder, local or pyarrow URI.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG file to write.")],
    n: Annotated[int, typer.Option("--n", "-n", min=1, help="How many wafers (the first valid ones).")] = 8,
    ids: Annotated[str | None, typer.Option("--ids", help="Comma-separated wafer ids to show instead.",
                                            show_default=False)] = None,
    predictions: Annotated[str | None, typer.Option(
        "--predictions", show_default=False,
        help="Predictions table (wafer_id, pred_map) to draw beside the truth.")] = None,
    ncols: Annotated[int, typer.Option("--ncols", min=1, help="Wafers side by side.")] = 1,
    config: ConfigOption = None,
    overrides: SetOption = None,
) -> None:
    """Render wafers as a PNG: die map | truth labels | prediction, with a class legend."""
    import pyarrow.compute as pc

    from fcn_core.render import render_wafers
    from fcn_core.validate import validate_table

    cfg = command_config(ctx, config, overrides)
    try:
        result = validate_table(read_wafer_table(source), n_classes=cfg.n_classes)
    except WaferTableError as exc:
        fail(f"{source}: {exc}")
    valid = result.valid
    if ids:
        wanted = [x.strip() for x in ids.split(",") if x.strip()]
        found = set(valid.column("wafer_id").to_pylist())
        for wafer_id in wanted:
            if wafer_id not in found:
                bad = result.quarantine.filter(pc.equal(result.quarantine.column("wafer_id").cast(pa.string()),
                                                        wafer_id))
                fail(f"wafer {wafer_id!r} is quarantined ({bad.column('reason')[0]})" if bad.num_rows
                     else f"wafer {wafer_id!r} is not in {source}")
        position = {w: i for i, w in enumerate(valid.column("wafer_id").to_pylist())}
        chosen = valid.take(pa.array([position[w] for w in wanted], pa.int64()))
    else:
        if valid.num_rows == 0:
            fail(f"{source}: no valid wafers to show ({result.n_quarantined:,} quarantined)")
        chosen = valid.slice(0, n)
    preds = prediction_maps(predictions, chosen) if predictions else None
    try:
        path = render_wafers(chosen, out, classes=cfg.classes, predictions=preds, ncols=ncols)
    except ValueError as exc:
        fail(str(exc))
    skipped = f" ({result.n_quarantined:,} invalid rows not shown)" if result.n_quarantined and not ids else ""
    console.print(f"wrote {path} ({chosen.num_rows} wafers){skipped}")


def prediction_maps(source: str, wafers: pa.Table) -> list[np.ndarray | None]:
    """The pred_map of each wafer (None when the predictions table has no row for it)."""
    table = read_wafer_table(source)
    if not {"wafer_id", "pred_map"} <= set(table.column_names):
        fail(f"{source}: a predictions table needs wafer_id and pred_map columns")
    blobs = dict(zip(table.column("wafer_id").to_pylist(), table.column("pred_map").to_pylist()))
    maps: list[np.ndarray | None] = []
    for wafer_id, h, w in zip(*(wafers.column(c).to_pylist() for c in ("wafer_id", "height", "width"))):
        blob = blobs.get(wafer_id)
        if blob is not None and len(blob) != h * w:
            fail(f"{source}: pred_map of {wafer_id!r} has {len(blob)} values, the wafer has {h} x {w} dies")
        maps.append(None if blob is None else np.frombuffer(blob, np.uint8).reshape(h, w))
    return maps


if __name__ == "__main__":
    app()
