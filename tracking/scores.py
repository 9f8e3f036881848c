"""Scores of a training in MLflow: one key per measure, so one chart shows every stage.

Each stage run gets ``test_fail_mean_iu``, ``test_fail_pixel_acc``, ... (the test split, fail dies
only) and ``test_on_wafer_*`` (every die on the wafer); the parent run gets the same keys with
step = the stage's place in the cascade (0 = FCN-32s ... 5 = FCN-1s, 6 = fine-tuned), so the
parent's ``test_fail_mean_iu`` chart is the 32s -> 1s ladder. Real-map verdict scores follow the
same rule (``real_macro_f1``, ...). Calibrated verdict thresholds are settings, not measurements:
params and a table artifact (``calibration/thresholds.json`` and ``.md``), never metrics.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

from mlflow.entities import Metric, Param

from fcn_core.config import VerdictConfig
from fcn_core.stages import FINETUNE, STAGES, stage_title
from tracking.store import RetryingClient

log = logging.getLogger(__name__)

SCORE_KEYS = ("mean_iu", "pixel_acc", "mean_acc", "fw_iu")
SCOPES = (("fail", "fail_only"), ("on_wafer", "on_wafer"))  # metric scope -> EvalScores attribute
CALIBRATION_DIR = "calibration"


def stage_step(stage: str) -> int:
    """The stage's place on the ladder: 0 = fcn32s ... 5 = fcn1s, 6 = finetune."""
    if stage in STAGES:
        return STAGES.index(stage)
    if stage == FINETUNE:
        return len(STAGES)
    raise ValueError(f"unknown stage {stage!r}; stages: {', '.join((*STAGES, FINETUNE))}")


def _finite(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _scope_values(scores: Any, attribute: str) -> Mapping[str, Any]:
    """``scores.fail_only`` of an EvalScores, or ``scores["fail_only"]`` of its dict form."""
    if isinstance(scores, Mapping):
        return scores.get(attribute) or {}
    return getattr(scores, attribute, None) or {}


def split_metrics(scores: Any) -> dict[str, float]:
    """``{"test_fail_mean_iu": ..., "test_on_wafer_pixel_acc": ...}`` of one stage's test scores
    (an ``EvalScores`` or its dict form with ``fail_only``/``on_wafer``); NaN scores are left out."""
    out: dict[str, float] = {}
    for scope, attribute in SCOPES:
        values = _scope_values(scores, attribute)
        for key in SCORE_KEYS:
            if (value := _finite(values.get(key))) is not None:
                out[f"test_{scope}_{key}"] = value
    return out


def _log_metrics(client: RetryingClient, run_id: str, metrics: Mapping[str, float], *, step: int = 0) -> None:
    now = int(time.time() * 1000)
    batch = [Metric(key, value, now, step) for key, raw in metrics.items() if (value := _finite(raw)) is not None]
    for start in range(0, len(batch), 1000):  # MLflow: 1000 metrics per log_batch
        client.log_batch(run_id, metrics=batch[start:start + 1000])


def log_stage_scores(client: RetryingClient, stage_run_id: str, scores: Any) -> dict[str, float]:
    """Log one stage's test scores on its own run (``test_fail_mean_iu``, ...); returns them."""
    metrics = split_metrics(scores)
    _log_metrics(client, stage_run_id, metrics)
    return metrics


def stage_run_ids(client: RetryingClient, parent_run_id: str) -> dict[str, str]:
    """{stage: run id} of the parent's stage runs (tag ``stage``, set by ``runs.start_stage_run``);
    a stage run again (a resumed training) maps to its newest run."""
    parent = client.get_run(parent_run_id)
    found = client.search_runs([parent.info.experiment_id],
                               filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                               order_by=["attributes.start_time ASC"], max_results=1000)
    return {run.data.tags["stage"]: run.info.run_id for run in found if run.data.tags.get("stage")}


def log_test_scores(client: RetryingClient, parent_run_id: str, scores_by_stage: Mapping[str, Any]) -> dict[str, str]:
    """Every stage's test scores: on its stage run (step 0) and on the parent at step =
    :func:`stage_step` (the ladder chart). Returns {stage: run id it was logged to}; a stage
    without a stage run is logged on the parent only, with a warning."""
    runs_by_stage = stage_run_ids(client, parent_run_id)
    logged: dict[str, str] = {}
    for stage, scores in scores_by_stage.items():
        metrics = split_metrics(scores)
        _log_metrics(client, parent_run_id, metrics, step=stage_step(stage))
        if stage in runs_by_stage:
            _log_metrics(client, runs_by_stage[stage], metrics)
            logged[stage] = runs_by_stage[stage]
        else:
            log.warning("no stage run of %s under run %s: its test scores are on the parent only", stage,
                        parent_run_id)
    return logged


def log_real_scores(client: RetryingClient, parent_run_id: str,
                    metrics_by_stage: Mapping[str, Mapping[str, float]]) -> None:
    """Real-map verdict scores (``VerdictReport.metrics(prefix="")``: accuracy, macro_f1, recall_<label>,
    ...) as ``real_<key>``: on each stage run, and on the parent at step = :func:`stage_step`."""
    runs_by_stage = stage_run_ids(client, parent_run_id)
    for stage, metrics in metrics_by_stage.items():
        keyed = {f"real_{key.removeprefix('real_')}": value for key, value in metrics.items()}
        _log_metrics(client, parent_run_id, keyed, step=stage_step(stage))
        if stage in runs_by_stage:
            _log_metrics(client, runs_by_stage[stage], keyed)


def thresholds_table(verdict: VerdictConfig, class_names: Sequence[str]) -> list[dict[str, Any]]:
    """One row per pattern: min_dies, min_share and the shape rule (min_elongation, when set)."""
    patterns = list(class_names[1:])
    min_dies, min_share = verdict.thresholds(patterns)
    return [{"pattern": name, "min_dies": int(dies), "min_share": float(share),
             "min_elongation": verdict.min_elongation_by_class.get(name)}
            for name, dies, share in zip(patterns, min_dies, min_share, strict=True)]


def _markdown(rows: list[dict[str, Any]], *, macro_f1: float | None, calibrated_on: str | None) -> str:
    lines = ["| pattern | min_dies | min_share | min_elongation |", "| --- | ---: | ---: | ---: |"]
    for row in rows:
        elongation = "" if row["min_elongation"] is None else f"{row['min_elongation']:g}"
        lines.append(f"| {row['pattern']} | {row['min_dies']} | {row['min_share']:.3f} | {elongation} |")
    head = f"Verdict thresholds calibrated on {calibrated_on or 'the config (not calibrated)'}"
    if macro_f1 is not None:
        head += f": macro-F1 {macro_f1:.3f} there"
    return f"# {head}\n\n" + "\n".join(lines) + "\n"


def log_calibration(client: RetryingClient, run_id: str, verdict: VerdictConfig, macro_f1: float | None,
                    class_names: Sequence[str]) -> list[dict[str, Any]]:
    """Calibrated verdict thresholds as params (``calibration.<pattern>.min_dies``, ...) and the
    artifacts ``calibration/thresholds.json`` and ``calibration/thresholds.md``; the macro-F1 they
    reach on the calibration maps is the one metric (``calibration_macro_f1``). Returns the rows.

    Params cannot change once logged: a value already on the run that differs (a calibration run
    twice on one run) is kept and a warning names it; the artifacts always hold the latest values.
    """
    rows = thresholds_table(verdict, class_names)
    f1 = _finite(macro_f1)
    params = {"calibration.calibrated_on": verdict.calibrated_on or "config"}
    for row in rows:
        key = row["pattern"].replace(" ", "_")
        params[f"calibration.{key}.min_dies"] = str(row["min_dies"])
        params[f"calibration.{key}.min_share"] = f"{row['min_share']:g}"
        if row["min_elongation"] is not None:
            params[f"calibration.{key}.min_elongation"] = f"{row['min_elongation']:g}"
    existing = client.get_run(run_id).data.params
    clashing = {k: v for k, v in params.items() if k in existing and existing[k] != v}
    if clashing:
        log.warning("run %s already has calibration params %s: kept; see calibration/thresholds.json", run_id,
                    sorted(clashing))
    new = [Param(k, v) for k, v in params.items() if k not in existing]
    for start in range(0, len(new), 100):
        client.log_batch(run_id, params=new[start:start + 100])
    document = {"calibrated_on": verdict.calibrated_on, "macro_f1": f1, "rules": verdict.describe(),
                "thresholds": rows}
    client.log_text(run_id, json.dumps(document, indent=2) + "\n", f"{CALIBRATION_DIR}/thresholds.json")
    client.log_text(run_id, _markdown(rows, macro_f1=f1, calibrated_on=verdict.calibrated_on),
                    f"{CALIBRATION_DIR}/thresholds.md")
    if f1 is not None:
        _log_metrics(client, run_id, {"calibration_macro_f1": f1})
    return rows

