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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fcn_core.atomic import clean_stale_temps
from fcn_core.config import Config, load_config
from fcn_core.table import (
    WaferTableError, read_parquet, resolve_fs, write_parquet_atomic, write_parquet_chunks_atomic,
)

if TYPE_CHECKING:  # the flows import Prefect: only the orchestration commands load them
    from flows.nightly_inference import NightlyResult
    from flows.params import ConfigParams
    from flows.train_fcn import TrainingSummary

P = TypeVar("P", bound="ConfigParams")

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
    """Generate, validate, ingest and look at wafer maps; train the FCN cascade (FCN-32s -> 16s -> 8s,
    on to die-level FCN-1s) and score with it."""
    ctx.obj = CliState(config=config or "default", overrides=list(overrides or []))


def fail(message: str, *, code: int = 1) -> NoReturn:
    """Stop with a one-line message on stderr (no traceback)."""
    typer.echo(f"error: {' '.join(str(message).split())}", err=True)
    raise typer.Exit(code)


def command_config(ctx: typer.Context, config: str | None = None, overrides: list[str] | None = None) -> Config:
    """The config of this invocation: the command's -c/--set win over the global ones."""
    state = ctx.find_object(CliState) or CliState()
    return load_named_config(config or state.config, [*state.overrides, *(overrides or [])])


def load_named_config(name: str, overrides: list[str] | dict) -> Config:
    """``load_config`` with the CLI's one-line errors."""
    try:
        return load_config(name, overrides)
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
    prepare_output(out)
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
            try:
                path = write_parquet_chunks_atomic(_advancing(chunks, progress, task), out)
            except (WaferTableError, OSError) as exc:
                fail(f"cannot write {out}: {exc}")
    else:
        with console.status(f"generating {n:,} wafers"):
            table = generator.generate_wafers(n, seed=seed, synth=cfg.data.synth, classes=cfg.classes)
            path = write_output(table, out)
    console.print(f"wrote {n:,} wafers to {path}")


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


def _advancing(chunks: Iterable[pa.Table], progress: Progress, task) -> Iterator[pa.Table]:
    for chunk in chunks:
        yield chunk
        progress.advance(task, chunk.num_rows)


def prepare_output(dest: str | os.PathLike, *, inputs: str | os.PathLike | None = None) -> str:
    """Check a local output path before any work: not a folder, not (inside) the input; then clear
    temporary files that a killed earlier run left beside it. Returns ``dest`` as given."""
    fs, path = resolve_fs(dest)
    if not isinstance(fs, pafs.LocalFileSystem):
        return str(dest)
    out = Path(path)
    if out.is_dir():
        fail(f"{dest}: is a folder; give a file name for the output (e.g. {join_path(dest, out.name + '.parquet')})")
    if inputs is not None:
        in_fs, in_path = resolve_fs(inputs)
        if isinstance(in_fs, pafs.LocalFileSystem) and Path(in_path).exists():
            source, resolved = Path(in_path).resolve(), out.resolve()
            if source.is_dir() and source in resolved.parents:
                fail(f"{dest}: is inside the input folder {inputs}; write the output somewhere else")
            if out.exists() and os.path.samefile(out, source):
                fail(f"{dest}: is the input file {inputs} (links resolved); write the output to another file")
    clean_stale_temps(out.parent)
    return str(dest)


def write_output(table: pa.Table, dest: str | os.PathLike) -> str:
    """``write_parquet_atomic`` with the one-line error of the CLI (e.g. a folder appeared meanwhile)."""
    try:
        return write_parquet_atomic(table, dest)
    except (WaferTableError, OSError) as exc:
        fail(f"cannot write {dest}: {exc}")


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
    outputs = [prepare_output(join_path(out_dir, name), inputs=source)
               for name in ("valid.parquet", "quarantine.parquet")]
    table = read_wafer_table(source)
    try:
        result = validate_table(table, n_classes=cfg.n_classes)
    except WaferTableError as exc:
        fail(f"{source}: {exc}")
    write_output(result.valid, outputs[0])
    write_output(result.quarantine, outputs[1])
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
    fmt: Annotated[str | None, typer.Option(
        "--format", show_default=False,
        help="parquet, wm811k (LSWMD.pkl), mixedwm38 (.npz) or g85 (XML) [default: from the extension]")] = None,
    trust: Annotated[bool, typer.Option("--trust", help="Allow unpickling a WM-811K .pkl (pickle runs code).")] = False,
    config: ConfigOption = None,
    overrides: SetOption = None,
) -> None:
    """Validate drops and add them to the curated store, partitioned by capture date.

    Non-Parquet sources (WM-811K pickle, MixedWM38 npz, SEMI G85 XML) are converted to a wafer table
    in <home>/drops first, then ingested like any drop.

    Re-ingesting a file already ingested (same content) is skipped. Bad rows go to the store's
    _quarantine/ folder. Exits 1 if a file could not be read (the others are still ingested).
    """
    from fcn_core.ingest import ingest

    cfg = command_config(ctx, config, overrides)
    root = curated or str(cfg.home_dir / "curated")
    sources = [_as_parquet_drop(cfg, src, fmt=fmt, trust=trust) for src in sources]
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


def _as_parquet_drop(cfg: Config, source: str, *, fmt: str | None, trust: bool) -> str:
    """Parquet sources pass through; other formats are read and written as a Parquet drop."""
    from fcn_core.readers import ReaderError, detect_format, read_any

    if "://" in source or not Path(source).expanduser().exists():
        return source  # URIs are Parquet; a missing path gets ingest's own clear error
    try:
        if (fmt or detect_format(source)) == "parquet":
            return source
        table = read_any(source, fmt=fmt, trust=trust)
    except (ReaderError, FileNotFoundError) as exc:
        fail(str(exc))
    return write_parquet_atomic(table, cfg.home_dir / "drops" / f"{Path(source).stem}.parquet")


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


# -- predict ---------------------------------------------------------------------------------------
@app.command()
def predict(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(metavar="IN.parquet", help="Wafer table to score (file, folder or URI).")],
    dest: Annotated[str, typer.Argument(metavar="OUT.parquet", help="Predictions table to write (atomically).")],
    model: Annotated[str | None, typer.Option(
        "--model", "-m", show_default=False,
        help="models:/wafer-fcn@champion (default), models:/NAME/VERSION, runs:/ID/model, a model folder or a "
             "scorer .pt (weights only: anything else is refused)"
    )] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Wafers per forward pass.")] = 256,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:1 ...")] = "auto",
    threads: Annotated[int | None, typer.Option("--threads", min=1, show_default=False,
                                                help="torch CPU threads [default: torch's]; 1 is fastest on a busy machine")] = None,
    config: ConfigOption = None,
    overrides: SetOption = None,
) -> None:
    """Score a wafer table: one predictions row per valid wafer.

    Columns: wafer_id, lot_id, captured_at, height, width, pred_map (label_map layout; pass and
    no-die positions are background), dies per pattern, fail_dies, yield, dominant_pattern (or
    'none') and its share, model_name, model_version. Invalid rows are reported, not scored.
    Uses the same code as the nightly-inference flow and the same tracking store as `make demo`.
    """
    from fcn_core.inference.runtime import resolve_device
    from fcn_core.validate import validate_table
    from tracking.registry import load_scorer_uri
    from tracking.store import StoreError

    cfg = command_config(ctx, config, overrides)
    prepare_output(dest, inputs=source)  # before any work: never overwrite the input, never a folder
    table = read_wafer_table(source)
    try:
        result = validate_table(table, n_classes=cfg.n_classes)
    except WaferTableError as exc:
        fail(f"{source}: {exc}")
    if result.n_quarantined:
        console.print(counts_table(f"{result.n_quarantined:,} invalid rows (not scored)", result.counts))
    uri = model or f"models:/{cfg.tracking.registered_model}@champion"
    dev = resolve_device(device)
    try:
        scorer, name, version = load_scorer_uri(uri, tracking_uri=cfg.tracking_uri, device=str(dev))
    except (LookupError, FileNotFoundError, ValueError, StoreError) as exc:
        fail(str(exc))
    with console.status(f"scoring {result.n_valid:,} wafers with {name} v{version} on {dev}"):
        scored = scorer.score_table(result.valid, model_name=name, model_version=str(version),
                                    batch_size=batch_size, device=dev, num_threads=threads)
    write_output(scored, dest)
    patterns = scored.column("dominant_pattern").value_counts().to_pylist()
    console.print(_pattern_table(patterns))
    console.print(f"scored {scored.num_rows:,} wafers ({result.n_quarantined:,} invalid) with {name} v{version} "
                  f"->  {dest}")


def _pattern_table(value_counts: list[dict]) -> Table:
    table = Table(title="wafers per dominant pattern", title_justify="left")
    table.add_column("pattern")
    table.add_column("wafers", justify="right")
    for row in sorted(value_counts, key=lambda r: -r["counts"]):
        table.add_row(str(row["values"]), f"{row['counts']:,}")
    return table


# -- orchestration: train, nightly, demo, stack ---------------------------------------------------
def _prefect_env(cfg: Config) -> None:
    """Embedded defaults: Prefect's state lives in the project home, no analytics (offline machines).

    Must run before prefect is imported; a user's own PREFECT_HOME / PREFECT_API_URL win.
    """
    os.environ.setdefault("PREFECT_HOME", str(cfg.home_dir / "prefect"))
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)  # its SQLite lives here
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # leases on disk: a killed training's GPU slot can be released by a later start (tasks/recovery.py)
    os.environ.setdefault("PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE",
                          "prefect.server.concurrency.lease_storage.filesystem")
    import logging

    # MLflow's per-run INFO lines (system-metrics monitor start/stop, pickle advice) drown the results.
    logging.getLogger("mlflow").setLevel(logging.ERROR)


def _temporary_api() -> None:
    """Without a configured Prefect API, start a temporary server that dies with this process
    (Prefect's own outlives a ``kill -9`` of the CLI); see tasks/prefect_server.py."""
    import sys

    if "prefect.context" in sys.modules:  # prefect already loaded (tests): its settings decide
        from prefect.settings import get_current_settings

        configured = get_current_settings().api.url
    else:
        from prefect.settings.models.root import Settings  # env + the profile in PREFECT_HOME

        configured = Settings().api.url
    if configured:
        return
    from tasks import prefect_server

    try:
        with console.status("starting a temporary Prefect server"):
            server = prefect_server.start()
    except RuntimeError as exc:
        fail(str(exc))
    os.environ["PREFECT_API_URL"] = server.api_url
    from prefect.context import refresh_global_settings_context

    refresh_global_settings_context()


def _run_flow(run):
    """Call a flow in this process; a failed flow becomes a one-line error, not a traceback, and
    Ctrl-C ends it with one line and exit code 130."""
    from prefect.exceptions import FailedRun

    from tasks.runtime import SlotWaitInterrupted

    try:
        return run()
    except FailedRun as exc:
        fail(str(exc))
    except SlotWaitInterrupted as exc:
        fail(str(exc), code=130)
    except KeyboardInterrupt:
        fail("interrupted", code=130)


def flow_params(ctx: typer.Context, params_type: type[P], config: str | None = None,
                overrides: list[str] | None = None, **fields) -> tuple[P, Config]:
    """The flow's parameters, built once from this invocation's options (the command's -c/--set win
    over the global ones), and their config, for the CLI's own use (home, printing); the flow loads
    its config from the parameters. Set up Prefect's embedded defaults for that config."""
    state = ctx.find_object(CliState) or CliState()
    params = params_type(config=config or state.config, overrides=[*state.overrides, *(overrides or [])], **fields)
    cfg = load_named_config(params.config, params.overrides)
    _prefect_env(cfg)
    _temporary_api()
    return params, cfg


def _print_training(cfg: Config, result: TrainingSummary, seconds: float) -> None:
    from rich.markdown import Markdown

    from fcn_core.report import REAL_HEADLINES

    console.print(Markdown(result.results_markdown))
    reg = result.registration
    console.print(
        f"registered [bold]{reg.name} v{reg.version}[/bold] "
        f"({result.stage}, test mean IU on fail dies {reg.candidate_score:.4f}) as [bold]{reg.alias}[/bold]"
        + (f" (champion re-scored {reg.champion_score:.4f})" if reg.champion_score is not None else "")
        + f" in {seconds:.0f} s")
    by_stage = result.real_by_stage
    for stage, real in by_stage.items():  # the held-out tables' scoring parts (never trained on)
        shown = [f"{label} {real[key]:.3f}" for key, label in REAL_HEADLINES.items() if real.get(key) is not None]
        console.print(f"held-out real maps, {stage}: " + ", ".join(shown))
    console.print(f"MLflow run {result.mlflow_run_id}: browse with\n"
                  f"  mlflow ui --backend-store-uri {cfg.tracking_uri}")


@app.command()
def train(
    ctx: typer.Context,
    source: Annotated[str | None, typer.Option(
        "--source", show_default=False,
        help="Wafer-table drops to train on (file, folder or URI); default: data.source, else synthetic.")] = None,
    config: ConfigOption = None,
    overrides: SetOption = None,
) -> None:
    """Run the train-fcn flow here (Prefect's embedded API unless PREFECT_API_URL is set).

    ingest -> preprocess/split -> FCN-32s -> FCN-16s -> FCN-8s (-> 4s -> 2s -> 1s, train.final_stage)
    (-> weak-label fine-tuning on real maps, train.finetune.enabled) -> evaluate -> register in MLflow
    (alias champion if at least as good as the current champion on this run's test split).
    """
    import time

    from flows.params import TrainParams

    params, cfg = flow_params(ctx, TrainParams, config, overrides, source=source)
    from flows.train_fcn import train_fcn

    t0 = time.perf_counter()
    result = _run_flow(lambda: train_fcn(params))
    _print_training(cfg, result, time.perf_counter() - t0)


def _print_nightly(result: NightlyResult) -> None:
    console.print(f"nightly-inference with {result.model}: {result.wafers_scored:,} wafers scored in "
                  f"{len(result.scored_partitions)} partition(s), {len(result.skipped)} already up to date")
    for date, out in sorted(result.outputs.items()):
        console.print(f"  {date}: {out}")
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")


@app.command()
def nightly(
    ctx: typer.Context,
    source: Annotated[str | None, typer.Option(
        "--source", show_default=False, help="Ingest these drops first (file, folder or URI).")] = None,
    task_runner: Annotated[str, typer.Option("--task-runner", help="threads or dask")] = "threads",
    config: ConfigOption = None,
    overrides: SetOption = None,
) -> None:
    """Run the nightly-inference flow here: score curated partitions not scored yet with the champion."""
    from flows.params import NightlyParams

    try:
        params, _ = flow_params(ctx, NightlyParams, config, overrides, source=source, task_runner=task_runner)
    except ValidationError as exc:  # e.g. --task-runner neither threads nor dask
        fail("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))
    from flows.nightly_inference import NightlyResult, nightly_inference

    result = _run_flow(lambda: nightly_inference(params))
    if not isinstance(result, NightlyResult):  # a Failed state returned by the flow (e.g. no champion yet)
        fail(getattr(result, "message", None) or str(result))
    _print_nightly(result)


@app.command()
def demo(
    ctx: typer.Context,
    config: ConfigOption = None,
    overrides: SetOption = None,
) -> None:
    """The whole product on embedded defaults, as the `demo` flow: train, register, score a new night.

    1. train-fcn flow: synthesise wafers, ingest, train FCN-32s -> 16s -> 8s (-> 1s), fine-tune on
       real maps, evaluate, register.
    2. A fresh synthetic night lands in <home>/drops and the nightly-inference flow scores it.
    3. Pictures of that night's predictions, and where to look next (MLflow UI, Parquet files).
    """
    from flows.params import DemoParams  # not flows.demo yet: Prefect is imported after _prefect_env

    params, cfg = flow_params(ctx, DemoParams, config, overrides)
    from flows.demo import demo as demo_flow

    console.rule(f"[bold]demo flow[/bold] (config {cfg.name}, home {cfg.home_dir})")
    summary = _run_flow(lambda: demo_flow(params))

    console.rule("[bold]1/3 train-fcn[/bold]")
    _print_training(cfg, summary.training, summary.train_seconds)
    console.rule(f"[bold]2/3 nightly-inference[/bold] on a new synthetic night ({summary.night})")
    _print_nightly(summary.nightly)
    console.rule("[bold]3/3 results[/bold]")
    if summary.picture is not None:
        console.print(_pattern_table([{"values": k, "counts": v} for k, v in summary.picture.patterns.items()]))
        console.print(f"picture of {summary.picture.wafers} wafers (die map | truth | prediction): "
                      f"{summary.picture.path}")
    console.print(f"results table: {summary.training.evaluation.results_md}")
    console.print(f"MLflow UI:      mlflow ui --backend-store-uri {cfg.tracking_uri}   (or: make stack-up)")
    console.print("score a file:   .venv/bin/wafer-fcn predict IN.parquet OUT.parquet")


stack_app = typer.Typer(help="The local stack: Prefect server + process work pool + worker + MLflow UI.",
                        no_args_is_help=True)
app.add_typer(stack_app, name="stack")


@stack_app.command("up")
def stack_up_command(
    ctx: typer.Context,
    port: Annotated[int | None, typer.Option("--port", help="Prefect server port [default: 4200 or a free one].",
                                             show_default=False)] = None,
    mlflow_port: Annotated[int, typer.Option("--mlflow-port", help="MLflow UI port.")] = 5000,
    config: ConfigOption = None,
    overrides: SetOption = None,
) -> None:
    """Start Prefect server on 127.0.0.1, the work pool, `prefect deploy --all`, a worker and the MLflow UI.

    PIDs and logs go to <home>/stack/. Then: `prefect deployment run train-fcn/train-fcn`.
    """
    cfg = command_config(ctx, config, overrides)
    _prefect_env(cfg)
    from flows.stack import StackError, stack_up

    try:
        info = stack_up(home=cfg.home_dir, port=port, mlflow_port=mlflow_port, echo=console.print)
    except StackError as exc:
        fail(str(exc))
    for key in ("prefect_ui", "mlflow_ui", "tracking_uri", "work_pool", "stack_dir"):
        console.print(f"{key:13} {info[key]}")
    exports = " ".join(f"{k}={v}" for k, v in info["env"].items())
    console.print(f"\nexport {exports}\nprefect deployment run train-fcn/train-fcn")


@stack_app.command("down")
def stack_down_command(ctx: typer.Context, config: ConfigOption = None, overrides: SetOption = None) -> None:
    """Stop the local stack started by `stack up` (worker first, then MLflow UI, then the server)."""
    cfg = command_config(ctx, config, overrides)
    from flows.stack import StackError, stack_down

    try:
        stack_down(home=cfg.home_dir, echo=console.print)
    except StackError as exc:
        fail(str(exc))


if __name__ == "__main__":
    app()
