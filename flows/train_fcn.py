"""Flow ``train-fcn``: ingest -> validate/quarantine -> preprocess/split -> FCN-32s -> FCN-16s -> FCN-8s
(-> FCN-4s -> 2s -> 1s, per ``train.final_stage``) (-> weak-label fine-tuning on real maps, per
``train.finetune.enabled``) -> evaluate -> register.

    prefect deployment run train-fcn/train-fcn -p params='{"config": "tiny"}'

MLflow: one parent run per flow run, a nested run per stage (ids passed into the tasks). Prefect:
a table artifact with the results table and a Markdown artifact linking the MLflow run.
Training, evaluation and registration hold one slot of the global concurrency limit
``params.gpu_limit`` (created with one slot if missing): one training per GPU at a time.

Crash recovery (``tasks.recovery``): the run folder is keyed by the config and the curated data,
so re-running a killed training resumes its stages; the start releases GPU slots of dead holders
and marks their MLflow runs KILLED and their flow runs CRASHED.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from fcn_core.config import Config
from fcn_core.evaluate import STAGE_TITLES
from fcn_core.report import Evaluation, StageOutcome
from fcn_core.train import FINETUNE, STAGES, stages_to_train
from flows.names import training_run_name
from flows.params import TrainParams
from flows.steps import ingest_drops
from tasks import recovery
from tasks.data import snapshot_splits, synthesise_drop
from tasks.runtime import gpu_slot
from tasks.training import (calibrate_task, evaluate_stages, prepare_real_task, pseudo_label_task, register_task,
                            scorer_task, train_stage_task)
from tracking import datasets, provenance, runs
from tracking.registry import RegistrationResult
from tracking.store import open_store

__all__ = ["TrainParams", "TrainingSummary", "train_fcn"]


@dataclass(frozen=True)
class TrainingSummary:
    """What one train-fcn run did: the MLflow run, the stage registered and the registry's decision,
    every stage's scores and real-map verdicts (``evaluation``), the data it saw and its folder."""

    mlflow_run_id: str
    stage: str
    registration: RegistrationResult
    evaluation: Evaluation
    data: dict  # counts per split, rows_valid, rows_quarantined
    run_dir: str

    @property
    def scores(self) -> dict[str, float]:
        """Test mean IU on fail dies per stage."""
        return {stage: s.fail_mean_iu for stage, s in self.evaluation.scores.items()}

    @property
    def real_by_stage(self) -> dict[str, dict[str, float | None]]:
        return self.evaluation.real_by_stage

    @property
    def results_markdown(self) -> str:
        """The text of this run's results.md."""
        return self.evaluation.markdown()


def _with_source(cfg: Config, source: str | None) -> Config:
    if source is None:
        return cfg
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": source})})


def choose_stage(results: dict[str, StageOutcome], *, prefer_finetune: bool = False) -> str:
    """The stage to register: the fine-tuned model if there is one and ``prefer_finetune``
    (train.finetune.candidate), else the cascade stage with the best validation mean IU (fail dies);
    ties go to the finer stage."""
    if prefer_finetune and FINETUNE in results:
        return FINETUNE
    results = {stage: r for stage, r in results.items() if stage != FINETUNE}

    def key(stage: str) -> tuple[float, int]:
        return (results[stage].ranking_score(), STAGES.index(stage))
    return max(results, key=key)


def run_markdown(cfg: Config, summary: TrainingSummary) -> str:
    """The flow's Markdown artifact: the MLflow run, the registry's decision, then results.md."""
    registration, parent, chosen = summary.registration, summary.mlflow_run_id, summary.stage
    url = runs.run_url(cfg, parent)
    link = f"[{parent}]({url})" if url else f"`{parent}`"
    lines = [
        f"# train-fcn: {registration.name} v{registration.version} -> `{registration.alias}`",
        "",
        f"- MLflow run: {link} (tracking store `{cfg.tracking_uri}`)",
        f"- Registered stage: {STAGE_TITLES.get(chosen, chosen)}, model `{registration.model_uri}`",
        f"- Test mean IU (fail dies): candidate {registration.candidate_score:.4f}, champion "
        + ("n/a (first version or unloadable)" if registration.champion_score is None
           else f"v{registration.previous_champion_version} re-scored {registration.champion_score:.4f}"),
    ]
    if not url:
        lines.append(f"- Browse it with `mlflow ui --backend-store-uri {cfg.tracking_uri}` "
                     "(or `make stack-up`), then open the `wafer-fcn` experiment.")
    lines += ["", "## Test split", "", summary.results_markdown]
    return "\n".join(lines) + "\n"


# results table artifact: short column names (the UI cuts long tables off), fail-die scores first
RESULTS_COLUMNS = {"model": "model", "wafers": "wafers", "fail_mean_iu": "fail_mean_iu", "fail_pixel_acc": "fail_pix_acc",
                   "fail_mean_acc": "fail_mean_acc", "fail_fw_iu": "fail_fw_iu", "mean_iu": "mean_iu",
                   "pixel_acc": "pix_acc"}


def results_table(rows: list[dict], *, registered: str) -> list[dict]:
    """The stages' test scores rounded to 3 decimals under short names, the registered stage marked."""
    title = STAGE_TITLES.get(registered, registered)
    table = []
    for row in rows:
        out = {short: (round(float(row[key]), 3) if isinstance(row.get(key), float) else row.get(key))
               for key, short in RESULTS_COLUMNS.items()}
        out["registered"] = "yes" if row.get("model") == title else ""
        table.append(out)
    return table


def train_stages(cfg: Config, *, client, parent: str, paths: dict[str, str],
                 run_dir: Path) -> dict[str, StageOutcome]:
    """FCN-32s -> 16s -> 8s (-> 4s -> 2s -> 1s), each from the previous stage's best checkpoint, then
    the optional weak-label fine-tuning on real maps; each stage in its own MLflow run."""
    stages = list(stages_to_train(cfg)) + ([FINETUNE] if cfg.finetune_enabled else [])
    # with real maps at hand, the synthetic-only model and the fine-tuned one both get verdict
    # thresholds fitted on wm811k-val's calibration part, so the scoring-part comparison is like for like
    calibrated = {stages[-2], FINETUNE} if cfg.finetune_enabled else set()
    results: dict[str, StageOutcome] = {}
    init = None
    for stage in stages:
        stage_run = runs.start_stage_run(client, cfg, parent_run_id=parent, stage=stage)
        recovery.tag_with_process(client, stage_run)
        status = "FAILED"
        try:
            weak_labels = cfg.train.finetune.weak_labels
            joint = stage == FINETUNE and "weak_train" in paths  # real maps beside synthetic, wafer-level loss
            weak_path = paths.get("weak_train") if joint else None
            if stage == FINETUNE and weak_labels == "pseudo_masks":  # masks from the model before it
                pseudo_label_task(cfg=cfg, checkpoint=init, real_train_path=paths["real_train"],
                                  synthetic_path=paths["train"], dest=paths["finetune_train"], stage_run_id=stage_run)
            if joint and weak_labels == "both":  # the real half also taught the previous model's masks
                weak_path = str(run_dir / "data" / "weak_train_masked.parquet")
                pseudo_label_task(cfg=cfg, checkpoint=init, real_train_path=paths["weak_train"], dest=weak_path,
                                  stage_run_id=stage_run)
            train_path = paths["finetune_train"] if stage == FINETUNE and not joint else paths["train"]
            outcome = train_stage_task(
                cfg=cfg, stage=stage, train_path=train_path, val_path=paths["val"],
                out_dir=str(run_dir / "checkpoints"), init_checkpoint=init, stage_run_id=stage_run,
                weak_path=weak_path)
            best = outcome.best_checkpoint  # the next stage starts from it, never from a calibrated copy
            scorer = (  # what is evaluated and registered: the model and its verdict rules
                calibrate_task(cfg=cfg, checkpoint=best, real_path=paths["real_calibration"], stage_run_id=stage_run,
                               mixed_path=paths.get("mixed_calibration"))
                if stage in calibrated else scorer_task(cfg=cfg, checkpoint=best))
            results[stage] = outcome.model_copy(update={"scorer": scorer})
            status = "FINISHED"
        finally:
            runs.end_run(client, stage_run, status)
        init = results[stage].best_checkpoint
    return results


@flow(name="train-fcn", flow_run_name=training_run_name, log_prints=True)
def train_fcn(params: TrainParams = TrainParams()) -> TrainingSummary:
    """Train FCN-32s -> 16s -> 8s (-> 1s, fine-tuning) on the curated store, evaluate, register the model."""
    log = get_run_logger()
    cfg = _with_source(params.load(), params.source)
    home = cfg.home_dir
    curated_root = home / "curated"
    crash_killed_trainings()
    log.info("config %s, home %s", cfg.name, home)

    # data: drops -> curated store -> this run's frozen train/val/test snapshot
    source = cfg.data.source or synthesise_drop(cfg=cfg, drops_dir=str(home / "drops"))
    data = ingest_drops(cfg, source=source, curated_root=curated_root,
                        max_quarantined_share=params.max_quarantined_share)
    client = open_store(cfg)  # not before the data gate: a run that never trains tracks nothing
    recovery.kill_dead_mlflow_runs(client, client.get_experiment_by_name(cfg.tracking.experiment).experiment_id)
    folder = recovery.RunFolder.claim(home / "runs", recovery.run_key(
        cfg.to_dict(), recovery.curated_fingerprint(str(curated_root))))
    try:
        return _train_in(folder, cfg, params, client=client, data=data)
    finally:
        folder.release()


def crash_killed_trainings() -> None:
    """Tag this flow run with its process; set CRASHED the train-fcn runs killed on this host.
    (Their MLflow runs become KILLED once the data gate passed, their GPU slots are released
    when this run asks for one.)"""
    from prefect.client.orchestration import get_client

    this_run = flow_run.get_id()
    with get_client(sync_client=True) as prefect:
        if this_run:
            recovery.claim_flow_run(prefect, this_run)
        recovery.crash_dead_flow_runs(prefect, "train-fcn", exclude={this_run} if this_run else set())


def _train_in(folder: recovery.RunFolder, cfg: Config, params: TrainParams, *, client,
              data: dict) -> TrainingSummary:
    log = get_run_logger()
    run_dir, curated_root = folder.path, cfg.home_dir / "curated"
    log.info("run folder %s%s", run_dir, " (resuming an interrupted training)" if folder.resumed else "")
    snap = snapshot_splits(curated_root=str(curated_root), out_dir=str(run_dir / "data"),
                           pad_multiple=cfg.data.pad_multiple, pad_fixed=cfg.data.pad_fixed)
    paths = dict(snap["paths"])
    real_scoring = None
    if cfg.finetune_enabled:  # real maps: -train tables to fine-tune on, -val tables to calibrate and score
        real = prepare_real_task(cfg=cfg, train_path=paths["train"], out_dir=str(run_dir / "data"))
        paths["finetune_train"] = real["paths"]["train"]  # weak real maps (+ synthetic train)
        paths["real_train"] = real["paths"]["real_train"]  # the real maps trained on, as read
        paths["real_calibration"] = real["paths"]["real_calibration"]  # verdict thresholds, never trained on
        for key in ("weak_train", "mixed_calibration"):  # wafer_labels training; thresholds for `patterns` too
            if key in real["paths"]:
                paths[key] = real["paths"][key]
        real_scoring = {k: real["paths"][f"{k}_scoring"] for k in ("real", "mixed") if f"{k}_scoring" in real["paths"]}

    inputs = [p for p in [*paths.values(), *(real_scoring or {}).values()] if Path(p).exists()]  # pseudo-masks: later
    parent = runs.start_parent_run(client, cfg, data_fingerprint=provenance.data_fingerprint(inputs))
    logged = {**paths, **{f"{k}_scoring": v for k, v in (real_scoring or {}).items()}}
    datasets.log_datasets(client, parent, {k: v for k, v in logged.items() if Path(v).exists()})
    client.set_tag(parent, "prefect.flow_run_id", flow_run.get_id() or "")
    client.set_tag(parent, "wafer_fcn.run_dir", str(run_dir))
    recovery.tag_with_process(client, parent)
    for split, n in snap["counts"].items():
        client.log_metric(parent, f"data/{split}_wafers", n)
    client.log_metric(parent, "data/rows_quarantined", data["rows_quarantined"])

    # GPU work: one training per GPU at a time
    status = "FAILED"
    try:
        with gpu_slot(params.gpu_limit, flow_run_id=flow_run.get_id(), info=log.info):
            results = train_stages(cfg, client=client, parent=parent, paths=paths, run_dir=run_dir)
            chosen = choose_stage(results, prefer_finetune=cfg.train.finetune.candidate)
            # with fine-tuning, compare the last synthetic-only stage and the fine-tuned model on held-out real maps
            real_stages = list(dict.fromkeys([chosen, stages_to_train(cfg)[-1], FINETUNE] if FINETUNE in results
                                             else [chosen]))
            evaluation = evaluate_stages(
                cfg=cfg, scorers={s: r.scorer for s, r in results.items()},
                test_path=paths["test"], out_dir=str(run_dir / "evaluation"),
                histories=[h for r in results.values() for h in r.history], parent_run_id=parent,
                model_stage=chosen, real_scoring=real_scoring, real_stages=real_stages)
            registration = register_task(
                cfg=cfg, parent_run_id=parent, scorer_path=results[chosen].scorer,
                candidate_score=evaluation.fail_mean_iu(chosen), test_path=paths["test"],
                stage=chosen)
        status = "FINISHED"
    finally:
        runs.end_run(client, parent, status)
    folder.complete(flow_run_id=flow_run.get_id(), mlflow_run_id=parent, registered_version=registration.version)

    summary = TrainingSummary(
        mlflow_run_id=parent, stage=chosen, registration=registration, evaluation=evaluation, run_dir=str(run_dir),
        data={"counts": snap["counts"], **{k: data[k] for k in ("rows_valid", "rows_quarantined")}})
    url = runs.run_url(cfg, parent)
    create_table_artifact(key="train-fcn-results", table=results_table(evaluation.rows, registered=chosen),
                          description="Test split scores per stage, fail dies first (MLflow run "
                          + (f"[{parent}]({url})" if url else f"`{parent}`") + ")")
    create_markdown_artifact(key="train-fcn-mlflow", markdown=run_markdown(cfg, summary),
                             description="MLflow run and registry decision")
    return summary


if __name__ == "__main__":
    train_fcn()
