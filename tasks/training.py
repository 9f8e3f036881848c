"""Training tasks of the train-fcn flow: one task run per FCN stage, evaluation, registration.

Each task takes the typed ``Config`` and rebuilds what it needs from paths (the split snapshots,
the checkpoints); it logs to MLflow through this process's one client for the config's store
(``tracking.store.client``) and an explicit run id, so it runs the same in a worker thread, a
Dask worker or another process. Results are typed (``fcn_core.report``), never dicts. No retries
on training: a failed epoch is a bug or bad data, and re-running the stage resumes from its last
checkpoint anyway.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from fcn_core.config import Config
from fcn_core.data import WaferSet
from fcn_core.evaluate import (STAGE_TITLES, EvalScores, evaluate, evaluate_real, results_frame, write_real_report,
                               write_report)
from fcn_core.evaluate import results_markdown as test_markdown
from fcn_core.report import Evaluation, RealMapsReport, StageOutcome, StageScores, results_markdown
from fcn_core.inference.runtime import resolve_device
from fcn_core.overlay import OverlayPick, pick_overlay_wafers
from fcn_core.render import render_curves, render_wafers
from fcn_core.scorer import SCORER_FILE, Scorer, load_scorer, save_scorer, scorer_from_checkpoint
from fcn_core.table import FAIL, WAFER_COLUMNS, WAFER_SCHEMA, read_parquet, write_parquet_atomic
from fcn_core.train import train_stage
from fcn_core.validate import validate_table
from fcn_core.weak import holdout_mask, weak_label_table
from tracking import runs
from tracking import scores as tracking_scores
from tracking.registry import RegistrationResult, register_model
from tracking.store import RetryingClient, client

OVERLAY_PER_CLASS = 2  # test overlay: wafers drawn per pattern class
OVERLAY_WORST_MISSES = 4  # ... and wafers with the lowest fail-die accuracy


def _load_split(path: str) -> WaferSet:
    return WaferSet.from_table(read_parquet(path))


def _store(cfg: Config) -> RetryingClient:
    """This process's MLflow client for the config's store (the flow opened the store already)."""
    return client(cfg.tracking_uri)


def _finite(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(float(value)) else None


@task(name="train-stage", task_run_name="train-{stage}", cache_policy=NO_CACHE)
def train_stage_task(*, cfg: Config, stage: str, train_path: str, val_path: str, out_dir: str,
                     init_checkpoint: str | None, stage_run_id: str) -> StageOutcome:
    """Train one FCN stage (resuming from its last checkpoint), logging epochs to ``stage_run_id``."""
    client = _store(cfg)
    result = train_stage(cfg, stage=stage, train_set=_load_split(train_path), val_set=_load_split(val_path),
                         out_dir=out_dir, init_checkpoint=init_checkpoint, resume=True,
                         on_epoch=runs.epoch_logger(client, stage_run_id), progress=True)
    for key, value in (("best_val_fail_mean_iu", result.best_val_mean_iu), ("best_epoch", result.best_epoch),
                       ("train_seconds", result.seconds), ("train_wafers_per_s", result.wafers_per_s)):
        if (v := _finite(value)) is not None:
            client.log_metric(stage_run_id, key, v)
    get_run_logger().info("%s: best val mean IU (fail dies) %.4f at epoch %d, %.1f s, %.0f wafers/s", stage,
                          result.best_val_mean_iu, result.best_epoch + 1, result.seconds, result.wafers_per_s)
    return StageOutcome(**result.to_dict())


@task(name="prepare-real-maps", cache_policy=NO_CACHE)
def prepare_real_task(*, cfg: Config, train_path: str, out_dir: str) -> dict:
    """Split the real labelled maps into a fine-tune part and a held-out part (by lot, fixed salt),
    weak-label the fine-tune part and write this run's fine-tuning train set.

    Returns paths (``train``: weak real maps, plus the synthetic train split when
    ``mix_synthetic``; ``holdout``: real maps for evaluation only; ``real_finetune``: the other
    real maps, all of them, for calibrating verdict thresholds) and counts.
    """
    ft = cfg.train.finetune
    source = cfg.eval.real_data_path()
    if not source:
        raise ValueError("train.finetune.enabled=true needs real labelled maps, but eval.real_data is unset and "
                         "../shared/data/wm811k-val.parquet is absent: set eval.real_data to a wafer table")
    checked = validate_table(read_parquet(source), n_classes=cfg.n_classes)
    real = checked.valid  # exactly WAFER_SCHEMA
    held = holdout_mask(real, fraction=ft.holdout_fraction)
    weak, report = weak_label_table(real.filter(pa.array(~held)), class_names=cfg.class_names,
                                    max_per_class=ft.max_per_class, seed=cfg.train.seed)
    parts = [weak]
    if ft.mix_synthetic:
        parts.append(read_parquet(train_path).select(WAFER_COLUMNS).cast(WAFER_SCHEMA))
    out = Path(out_dir)
    paths = {"train": str(out / "finetune_train.parquet"), "holdout": str(out / "real_holdout.parquet"),
             "real_finetune": str(out / "real_finetune.parquet")}
    write_parquet_atomic(pa.concat_tables(parts), paths["train"])
    write_parquet_atomic(real.filter(pa.array(held)), paths["holdout"])
    write_parquet_atomic(real.filter(pa.array(~held)), paths["real_finetune"])  # for verdict calibration
    counts = {"real_valid": real.num_rows, "real_quarantined": checked.n_quarantined,
              "holdout": int(held.sum()), "weak": weak.num_rows,
              "synthetic": parts[1].num_rows if len(parts) > 1 else 0}
    get_run_logger().info("real maps %s: %d held out for evaluation; %d weakly labelled for fine-tuning %s "
                          "(dropped %s), plus %d synthetic", source, counts["holdout"], counts["weak"],
                          report.kept, report.dropped or "none", counts["synthetic"])
    return {"paths": paths, "counts": counts, "kept": report.kept, "dropped": report.dropped}


@task(name="build-scorer", cache_policy=NO_CACHE)
def scorer_task(*, cfg: Config, checkpoint: str) -> str:
    """The scorer bundle of a trained stage judged by the config's verdict rules, beside its checkpoint."""
    return str(save_scorer(scorer_from_checkpoint(checkpoint, verdict=cfg.verdict),
                           Path(checkpoint).with_name(SCORER_FILE)))


@task(name="calibrate-verdicts", cache_policy=NO_CACHE)
def calibrate_task(*, cfg: Config, checkpoint: str, real_path: str, stage_run_id: str) -> str:
    """Choose a model's verdict thresholds (min_dies, min_share, shared then per pattern) for the best
    macro-F1 on the fine-tune part of the real maps (never the held-out ones); returns the path of
    a scorer bundle with them, beside the checkpoint (which is left as it is)."""
    device = resolve_device(cfg.train.device)
    real = read_parquet(real_path)
    scorer, f1 = scorer_from_checkpoint(checkpoint, device=device).calibrated(
        WaferSet.from_table(real).die, real.column("wafer_label").to_pylist(), source=Path(real_path).name,
        device=device)
    dest = save_scorer(scorer, Path(checkpoint).with_name(SCORER_FILE))
    verdict = scorer.verdict
    tracking_scores.log_calibration(_store(cfg), stage_run_id, verdict, f1, cfg.class_names)
    get_run_logger().info("verdict thresholds calibrated on %d real maps: %s (macro-F1 %.3f there; scores are "
                          "reported on the held-out maps only)", real.num_rows, verdict.describe(), f1)
    return str(dest)


def _stage_scores(s: EvalScores) -> StageScores:
    """JSON-friendly scores (no confusion matrices): for task results and artifacts."""
    def clean(d: dict) -> dict:
        return {k: [float(x) for x in v] if isinstance(v, (list, np.ndarray)) else float(v) for k, v in d.items()}
    return StageScores(on_wafer=clean(s.on_wafer), fail_only=clean(s.fail_only), n_wafers=int(s.n_wafers))


def _overlay(scorer: Scorer, test: WaferSet, path: Path, *, class_names: list[str], device) -> list[Path]:
    """Die map | truth | prediction of a few test wafers of every pattern class (by truth) and the worst
    misses (lowest fail-die accuracy), titled by why each is drawn; the picks also as ``<name>.json``."""
    preds = scorer.predict_maps(test.die, device=device)
    picks = pick_overlay_wafers(test.wafer_ids, test.die, test.label, preds, class_names=class_names,
                                per_class=OVERLAY_PER_CLASS, worst=OVERLAY_WORST_MISSES)
    if not picks:  # no labels and no fail dies: draw the first wafers rather than nothing
        picks = [OverlayPick(i, "first", None, None, test.wafer_ids[i]) for i in range(min(4, len(test)))]
    wafers = test.subset([p.index for p in picks])
    picture = render_wafers(wafers.die, path, classes=scorer.cfg.classes, label_maps=wafers.label,
                            predictions=[preds[p.index] for p in picks], titles=[p.title for p in picks], ncols=2)
    listing = path.with_suffix(".json")
    listing.write_text(json.dumps([{"wafer_id": test.wafer_ids[p.index], "reason": p.reason, "pattern": p.pattern,
                                    "fail_die_accuracy": p.fail_die_accuracy,
                                    "truth_patterns": _truth_patterns(test.label[p.index], class_names)}
                                   for p in picks], indent=1))
    return [picture, listing]


def _truth_patterns(label: np.ndarray | None, class_names: list[str]) -> list[str]:
    return [] if label is None else [class_names[c] for c in np.unique(label).tolist() if 0 < c < len(class_names)]


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_stages(*, cfg: Config, scorers: dict[str, str], test_path: str, out_dir: str,
                    histories: list[dict], parent_run_id: str, model_stage: str, real_path: str | None = None,
                    real_stages: list[str] | None = None) -> Evaluation:
    """The seed's results table for every stage on the test split, plus pictures, logged to the parent run.

    ``scorers``: the scorer bundle of each stage. The overlay picture shows ``model_stage`` (the
    stage that will be registered). Real-map verdicts are scored for ``real_stages`` (default:
    ``model_stage``) on ``real_path`` (default: ``eval.real_data``; the held-out part when
    fine-tuning). results.md is written once, from the returned :class:`Evaluation`.
    """
    client = _store(cfg)
    device = resolve_device(cfg.train.device)
    test = _load_split(test_path)
    scores: dict[str, EvalScores] = {}
    served = {stage: load_scorer(path, device=device) for stage, path in scorers.items()}
    for stage, scorer in served.items():
        scores[stage] = evaluate(scorer.model, test, n_classes=scorer.n_classes, device=device,
                                 multiple=scorer.pad_multiple, fixed=scorer.pad_fixed)
    out = Path(out_dir)
    real_source = real_path or cfg.eval.real_data_path()
    real_stages = real_stages or [model_stage]
    real: list[RealMapsReport] = []
    real_paths: dict[str, str] = {}
    for stage in real_stages if real_source else []:
        folder = out if len(real_stages) == 1 else out / f"real_{stage}"
        stage_paths, report = _evaluate_real_maps(
            cfg, served[stage], folder, stage=stage, device=device, source=real_source,
            title=f"Real wafer maps{', held-out part' if real_path else ''}: {STAGE_TITLES.get(stage, stage)}")
        real.append(report)
        real_paths.update(stage_paths if len(real_stages) == 1 else {f"{stage}_{k}": v for k, v in stage_paths.items()})
    tables = test_markdown(scores, class_names=cfg.class_names)
    paths = write_report(scores, out, class_names=cfg.class_names, markdown=results_markdown(tables, real))
    picture, listing = _overlay(served[model_stage], test, out / f"test_overlay_{model_stage}.png",
                                class_names=cfg.class_names, device=device)
    paths["overlay"], paths["overlay_wafers"] = str(picture), str(listing)
    if histories:
        paths["curves"] = str(render_curves(histories, out / "learning_curves.png"))
    paths.update(real_paths)
    runs.log_files(client, parent_run_id, list(paths.values()), artifact_path="evaluation")
    tracking_scores.log_test_scores(client, parent_run_id, scores)
    tracking_scores.log_real_scores(client, parent_run_id, {report.stage: report.metrics for report in real})
    rows = results_frame(scores, class_names=cfg.class_names).replace({np.nan: None}).to_dict(orient="records")
    return Evaluation(model_stage=model_stage, scores={k: _stage_scores(v) for k, v in scores.items()},
                      test_markdown=tables, rows=rows, paths=paths, real=real)


def _evaluate_real_maps(cfg: Config, scorer: Scorer, out: Path, *, stage: str, device, source: str,
                        title: str) -> tuple[dict[str, str], RealMapsReport]:
    """Wafer-level verdicts on real labelled maps, written to ``out``; the section for results.md."""
    log = get_run_logger()
    result = validate_table(read_parquet(source), n_classes=cfg.n_classes)
    table = result.valid
    if cfg.eval.real_max_wafers and cfg.eval.real_max_wafers < table.num_rows:
        # a seeded random sample: files are often sorted by label, so the first N would be one class
        pick = np.random.default_rng(0).choice(table.num_rows, cfg.eval.real_max_wafers, replace=False)
        table = table.take(np.sort(pick))
    real = evaluate_real(scorer, table, device=device)
    paths = write_real_report(real, table, out, cfg=cfg)
    metrics = real.report.metrics(prefix="")
    verdict = scorer.verdict
    thresholds = (f"Verdict thresholds: {verdict.describe()} ("
                  + (f"calibrated on {verdict.calibrated_on}" if verdict.calibrated_on else "config") + ").")
    log.info("%s %s: accuracy %.3f, macro-F1 %.3f on %d wafers", title, source, metrics.get("accuracy", float("nan")),
             metrics.get("macro_f1", float("nan")), table.num_rows)
    return paths, RealMapsReport(stage=stage, title=title, source=Path(source).name, n_wafers=table.num_rows,
                                 thresholds=thresholds, markdown=real.report.markdown,
                                 metrics=dict(metrics))


@task(name="register", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10)
def register_task(*, cfg: Config, parent_run_id: str, scorer_path: str, candidate_score: float,
                  test_path: str, stage: str) -> RegistrationResult:
    """Log and register the scorer bundle at ``scorer_path`` (its verdict rules go with it);
    ``champion`` moves only as ``fcn_core.promotion.decide`` says (at least the re-scored champion);
    ``stage`` (e.g. ``fcn1s``) goes into the version's description and tags.

    Retried: it talks to the tracking server and the artifact store. A retry after a partial
    registration may add one more version, which the alias policy handles like any other.
    """
    store = _store(cfg)
    test = _load_split(test_path)
    device = resolve_device(cfg.train.device)

    def rescore(scorer) -> float:
        return float(evaluate(scorer.model.to(device), test, n_classes=cfg.n_classes, device=device,
                              multiple=cfg.data.pad_multiple, fixed=cfg.data.pad_fixed).fail_only["mean_iu"])

    result = register_model(cfg, client=store, run_id=parent_run_id, scorer_path=scorer_path,
                            candidate_score=candidate_score, rescore=rescore, stage=stage)
    log = get_run_logger()
    log.info("registered %s v%s as %s (candidate %.4f, champion %s): %s", result.name, result.version, result.alias,
             result.candidate_score, "n/a" if result.champion_score is None else f"{result.champion_score:.4f}",
             result.reason)
    if result.override:
        log.warning("override tracking.replace_unloadable_champion used: %s", result.reason)
    return result
