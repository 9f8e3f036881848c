"""Flow ``nightly-inference``: score the curated partitions not scored yet with the champion model.

    prefect deployment run nightly-inference/nightly-inference          (scheduled 02:00 daily)

1. Load ``models:/wafer-fcn@champion`` (none yet: the run fails with one clear sentence); with
   ``params.source``, ingest those drops into the curated store first (cached by content).
2. Compare every date partition's part files with the watermark (``<home>/predictions/_watermark.json``):
   never scored -> score it; new part files since -> score only those; nothing new -> skip.
3. ``score_partition`` per partition, fanned out on threads or Dask (``params.task_runner``),
   each writing ``<home>/predictions/date=YYYY-MM-DD/predictions.parquet`` atomically; the
   watermark is updated after each one, so an interrupted night loses nothing and a re-run
   scores nothing twice.
4. Each night scored reported on its own, newest first (a first run scores every night of the store):
   an MLflow run of the newest night in the ``<experiment>-nightly`` experiment (counts and rates at
   step = the night, the lots worst first, a picture of its most affected wafers, where the
   predictions are), and Prefect Markdown and table artifacts linking it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.states import Failed

from fcn_core.config import Config
from fcn_core.inference.runtime import resolve_device
from fcn_core.ingest import list_partitions
from fcn_core.nightly_report import Night, lot_rows, newest_first, nights_markdown
from fcn_core.nightly_summary import JumpRule, read_predictions, summarise_night, trailing_window
from fcn_core.watermark import WATERMARK_NAME, Watermark
from flows.names import nightly_run_name
from flows.params import NightlyParams
from flows.steps import ingest_drops
from tasks.pictures import render_most_affected
from tasks.runtime import file_lock, make_task_runner
from tasks.scoring import file_exists, part_files, predictions_path, remember_scorer, score_partition
from tracking import nightly as tracking_nightly
from tracking import registry, runs
from tracking.store import client, reader

__all__ = ["NightlyParams", "NightlyResult", "nightly_inference"]


@dataclass(frozen=True)
class NightlyResult:
    """What one nightly run scored: the model, the partitions scored and skipped, the files written,
    the jump warnings of the night."""

    model: str  # name/version
    scored_partitions: list[str] = field(default_factory=list)
    wafers_scored: int = 0
    skipped: list[str] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)  # date -> predictions file
    warnings: list[str] = field(default_factory=list)


NIGHTLY_LOCK = ".nightly.lock"


def predictions_root(cfg: Config) -> Path:
    return cfg.home_dir / "predictions"


@flow(name="score-partitions")
def score_partitions(*, cfg: Config, plans: list[dict], curated_root: str, predictions_root: str,
                     model_name: str, model_version: str, run_ids: dict[str, str], chunk_rows: int) -> dict:
    """Fan ``score_partition`` out over ``plans``; record each success in the watermark as it lands.

    Runs as a subflow so the nightly flow can pick its task runner per run (threads or Dask).
    """
    log = get_run_logger()
    watermark = Watermark.load(Path(predictions_root) / WATERMARK_NAME)
    futures = {
        score_partition.submit(cfg=cfg, date=p["date"], curated_root=curated_root, parts=p["parts"],
                               action=p["action"], predictions_root=predictions_root, model_name=model_name,
                               model_version=model_version, run_ids=run_ids, chunk_rows=chunk_rows): p["date"]
        for p in plans
    }
    done, failed = [], {}
    for future in as_completed(list(futures)):
        date = futures[future]
        try:
            result = future.result()
        except Exception as exc:  # the other partitions still count; this one is retried next run
            failed[date] = f"{type(exc).__name__}: {exc}"
            log.error("partition %s not scored: %s", date, failed[date])
            continue
        watermark.record(date, parts=result["parts"], replace=result["action"] == "full", output=result["output"],
                         rows=result["rows"], model_name=model_name, model_version=model_version,
                         flow_run_id=run_ids.get("flow_run_id"))
        watermark.save()
        done.append(result)
    return {"done": sorted(done, key=lambda r: r["date"]), "failed": failed}


def _nights(cfg: Config, params: NightlyParams, results: list[dict]) -> list[Night]:
    """One summary per night scored, each against its own trailing week: nights are never added up."""
    root = str(predictions_root(cfg))
    rule = JumpRule(factor=params.jump_factor, min_increase=params.jump_min_increase,
                    min_wafers=params.jump_min_wafers)
    nights = []
    for result in results:
        day = result["date"]
        tonight = read_predictions(root, [day], class_names=cfg.class_names)
        history = read_predictions(root, trailing_window(day), class_names=cfg.class_names)
        nights.append(Night(day, int(result["scored"]), summarise_night(
            tonight, history, class_names=cfg.class_names, wafers_scored=int(result["scored"]), rule=rule)))
    return newest_first(nights)


def report_nights(cfg: Config, params: NightlyParams, results: list[dict], *, curated_root: str, name: str,
                  version) -> list[str]:
    """The night in both UIs: an MLflow run of the newest night (counts, rates, lots, picture, where the
    predictions are), then the Prefect Markdown and table artifacts linking it. Returns the jump warnings."""
    nights = _nights(cfg, params, results)
    newest = nights[0]
    output = next(r["output"] for r in results if r["date"] == newest.date)
    picture = render_most_affected(cfg=cfg, night=newest.date, curated_root=curated_root, predictions=output,
                                   out=str(cfg.home_dir / "nightly" / f"most_affected_{newest.date}.png"))
    model = f"{name}/{version}"
    warnings = [w for night in nights for w in night.summary.warnings]
    summary = newest.summary
    rates = summary.rates[summary.rates["date"] == newest.date]
    run_id = tracking_nightly.log_night(
        cfg, night=newest.date, wafers_scored=newest.scored, wafers=summary.wafers,
        pattern_counts=summary.pattern_counts, pattern_rates=dict(zip(rates["pattern"], rates["rate"], strict=True)),
        lots=summary.yield_loss_by_lot, predictions=output, model_name=name, model_version=str(version),
        flow_run_id=flow_run.get_id(), pictures=[picture],
        summary_markdown=nights_markdown(nights, model=model, flow_run=flow_run.get_id()),
        warnings=[w for w in warnings if w.startswith(newest.date)])
    for night in nights[1:]:  # earlier nights of this run: their own points on the same charts
        earlier = night.summary.rates[night.summary.rates["date"] == night.date]
        tracking_nightly.log_night_metrics(
            client(cfg.tracking_uri), run_id, night.date, pattern_counts=night.summary.pattern_counts,
            pattern_rates=dict(zip(earlier["pattern"], earlier["rate"], strict=True)), wafers=night.summary.wafers,
            wafers_scored=night.scored, warnings=sum(w.startswith(night.date) for w in warnings))
    markdown = nights_markdown(nights, model=model, flow_run=flow_run.get_id(), mlflow_run=run_id,
                               mlflow_url=runs.run_url(cfg, run_id))
    create_markdown_artifact(key="nightly-inference-summary", markdown=markdown,
                             description=f"Nightly inference of {newest.date}: patterns, worst lots, jump warnings")
    if rows := lot_rows(nights):
        create_table_artifact(key="nightly-yield-loss-by-lot", table=rows,
                              description="Yield lost to each pattern per lot (% of on-wafer dies), worst lot first")
    return warnings


@flow(name="nightly-inference", flow_run_name=nightly_run_name, log_prints=True)
def nightly_inference(params: NightlyParams = NightlyParams()):
    """Score new curated partitions with the champion model; idempotent and resumable."""
    log = get_run_logger()
    cfg = params.load()
    curated_root = params.curated_root or str(cfg.home_dir / "curated")
    out_root = str(predictions_root(cfg))
    # one nightly run per home at a time: model load, ingest, the watermark's plan and its updates
    # have one writer (two runs started together scored partitions twice)
    with file_lock(Path(out_root) / NIGHTLY_LOCK, what="the other nightly run of this home", info=log.info):
        try:
            # on the device score_partition runs on (the tasks share this scorer)
            scorer, name, version = registry.load_champion(cfg, device=str(resolve_device(cfg.train.device)))
        except registry.NoChampionError as exc:
            log.error("%s", exc)
            return Failed(message=str(exc))  # a clear failed state, not a traceback
        remember_scorer(cfg.tracking_uri, name, version, scorer)
        return _ingest_and_score(cfg, params, curated_root=curated_root, out_root=out_root, name=name,
                                 version=version)


def _ingest_and_score(cfg: Config, params: NightlyParams, *, curated_root: str, out_root: str, name: str,
                      version):
    log = get_run_logger()
    if params.source:  # production rows are scored whatever their quality share: no gate here
        ingested = ingest_drops(cfg, source=params.source, curated_root=curated_root, max_quarantined_share=1.0)
        log.info("ingested %s: %d valid, %d quarantined rows", params.source, ingested["rows_valid"],
                 ingested["rows_quarantined"])
    model_run_id = reader(cfg.tracking_uri).get_model_version(name, version).run_id or ""
    watermark = Watermark.load(Path(out_root) / WATERMARK_NAME)
    dates = list_partitions(curated_root)
    if params.dates is not None:
        dates = [d for d in dates if d in set(params.dates)]
    plans = [watermark.plan(d, part_files(curated_root, d), output_exists=file_exists(predictions_path(out_root, d)))
             for d in dates]
    todo = [p for p in plans if p.action != "skip"]
    for p in plans:
        log.info("partition %s: %s (%s)", p.date, p.action, p.reason)
    if not todo:
        log.info("nothing to score: %d partition(s) up to date with the watermark", len(plans))
        return NightlyResult(model=f"{name}/{version}", skipped=[p.date for p in plans])

    runner = make_task_runner(params.task_runner, dask_address=params.dask_address, dask_workers=params.parallelism)
    outcome = score_partitions.with_options(task_runner=runner)(
        cfg=cfg, plans=[{"date": p.date, "action": p.action, "parts": list(p.parts)} for p in todo],
        curated_root=curated_root, predictions_root=out_root, model_name=name, model_version=str(version),
        run_ids={"model_run_id": model_run_id, "flow_run_id": flow_run.get_id() or ""},
        chunk_rows=params.chunk_rows)
    done, failed = outcome["done"], outcome["failed"]

    if done:
        warnings = report_nights(cfg, params, done, curated_root=curated_root, name=name, version=version)
        for w in warnings:
            log.warning("%s", w)
    else:
        warnings = []
    if failed:
        return Failed(message=f"{len(failed)} partition(s) not scored (retried next run): "
                              + "; ".join(f"{d}: {why}" for d, why in sorted(failed.items())))
    return NightlyResult(model=f"{name}/{version}", scored_partitions=[r["date"] for r in done],
                         wafers_scored=sum(r["scored"] for r in done),
                         skipped=[p.date for p in plans if p.action == "skip"],
                         outputs={r["date"]: r["output"] for r in done}, warnings=warnings)


if __name__ == "__main__":
    nightly_inference()
