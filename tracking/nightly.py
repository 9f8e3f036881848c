"""The MLflow record of nightly scoring: one run per nightly flow run, in its own experiment.

Experiment ``<tracking.experiment>-nightly`` (default ``wafer-fcn-nightly``). Each run is named
``nightly-<night>`` and holds:

- metrics at **step = the night** (days since 1970-01-01) with the night's midnight (UTC) as
  timestamp, so a chart over the experiment's runs is a trend (x-axis *Step*, or *Time (wall)* for
  dates): ``wafers_scored``, ``wafers``, ``wafers_<pattern>`` (dominant-pattern counts),
  ``rate_<pattern>`` (share of the night's wafers), ``jump_warnings``;
- params ``night``, ``model``, ``predictions`` (where the night's predictions are) and the same as
  tags (``prefect.flow_run_id`` too), searchable in the runs table;
- artifacts ``lots.csv`` and ``lots.md`` (worst lots first), the night's picture (the most affected
  wafers) under ``pictures/`` and the summary Markdown when given.
"""

from __future__ import annotations

import datetime as dt
import io
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.entities import Metric, Param, RunTag

from fcn_core.config import Config
from tracking.runs import end_run, log_files, set_shared_view, shared_view_url
from tracking.store import MODEL_TRAINING_KIND, RetryingClient, experiment_id, open_store

NIGHTLY_SUFFIX = "-nightly"
NIGHTS_VIEW_KEY = "wafer-fcn-nights"  # shared view: charts against each night's date (metric timestamps)
NIGHTS_VIEW = {"globalLineChartConfig": {"xAxisKey": "time", "lineSmoothness": 0, "selectedXAxisMetricKey": ""},
               "selectedColumns": ["metrics.`wafers_scored`", "metrics.`jump_warnings`", "metrics.`rate_none`"],
               "orderByKey": "attributes.start_time", "orderByAsc": False}


def nightly_experiment(cfg: Config) -> str:
    return f"{cfg.tracking.experiment}{NIGHTLY_SUFFIX}"


def nights_chart_url(ui_url: str, experiment: str) -> str:
    """The nightly experiment's charts, one point per night on a date axis (:data:`NIGHTS_VIEW`)."""
    return shared_view_url(ui_url, experiment, NIGHTS_VIEW_KEY, charts=True)


def night_step(night: str) -> tuple[int, int]:
    """(step, timestamp ms) of a night ``YYYY-MM-DD``: days since 1970-01-01 and its midnight UTC."""
    try:
        day = dt.date.fromisoformat(night)
    except ValueError:
        raise ValueError(f"night must be a date YYYY-MM-DD, got {night!r}") from None
    midnight = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
    return (day - dt.date(1970, 1, 1)).days, int(midnight.timestamp() * 1000)


def _key(name: str) -> str:
    return name.strip().replace(" ", "_").replace("-", "_")


def log_night_metrics(client: RetryingClient, run_id: str, night: str, *, pattern_counts: Mapping[str, int],
                      pattern_rates: Mapping[str, float], wafers: int | None = None,
                      wafers_scored: int | None = None, warnings: int | None = None) -> list[Metric]:
    """One night's counts and rates on ``run_id`` at step = the night (call again for more nights)."""
    step, stamp = night_step(night)
    values: dict[str, float] = {}
    if wafers_scored is not None:
        values["wafers_scored"] = wafers_scored
    if wafers is not None:
        values["wafers"] = wafers
    if warnings is not None:
        values["jump_warnings"] = warnings
    values.update({f"wafers_{_key(name)}": count for name, count in pattern_counts.items()})
    values.update({f"rate_{_key(name)}": rate for name, rate in pattern_rates.items()})
    metrics = [Metric(key, float(value), stamp, step) for key, value in values.items()]
    if metrics:
        client.log_batch(run_id, metrics=metrics)
    return metrics


def worst_lots_first(lots: pd.DataFrame | Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """The lot table sorted by yield lost to patterns (sum of ``loss_*`` columns), worst first."""
    frame = lots.copy() if isinstance(lots, pd.DataFrame) else pd.DataFrame(list(lots))
    loss = [c for c in frame.columns if str(c).startswith("loss_")]
    if loss:
        frame = frame.assign(loss_total=frame[loss].sum(axis=1)).sort_values("loss_total", ascending=False,
                                                                             kind="stable")
    return frame.reset_index(drop=True)


def _lots_markdown(frame: pd.DataFrame, night: str) -> str:
    if frame.empty:
        return f"# Lots of {night}\n\nNo wafers scored.\n"
    return f"# Lots of {night}, worst first (yield points lost to each pattern)\n\n" + \
        frame.to_markdown(index=False, floatfmt=".3f") + "\n"


def log_night(
    cfg: Config,
    *,
    night: str,
    wafers_scored: int,
    wafers: int,
    pattern_counts: Mapping[str, int],
    pattern_rates: Mapping[str, float],
    lots: pd.DataFrame | Sequence[Mapping[str, Any]],
    predictions: str | os.PathLike,
    model_name: str,
    model_version: str,
    flow_run_id: str | None = None,
    pictures: Sequence[str | os.PathLike] = (),
    summary_markdown: str | None = None,
    warnings: Sequence[str] = (),
    client: RetryingClient | None = None,
) -> str:
    """Record one nightly flow run as a finished MLflow run in the nightly experiment; returns its id.

    ``night`` is the newest night scored (``YYYY-MM-DD``); ``pattern_counts`` and ``pattern_rates``
    are that night's (dominant pattern -> wafers, share of wafers); ``lots`` the lot table
    (``lot_id``, ``wafers``, ``mean_yield``, ``loss_<pattern>``); ``predictions`` where the
    night's predictions were written; ``pictures`` the night's images (most affected wafers).
    A missing picture is an error before anything is logged.
    """
    night_step(night)  # a bad night is refused before anything is created
    missing = [str(p) for p in pictures if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"nightly MLflow record of {night}: no such picture {', '.join(missing)}")
    client = client or open_store(cfg)
    experiment = experiment_id(client, cfg, name=nightly_experiment(cfg), kind=MODEL_TRAINING_KIND)
    set_shared_view(client, experiment, NIGHTS_VIEW_KEY, NIGHTS_VIEW)
    model = f"{model_name}/{model_version}"
    info = {"night": night, "model": model, "predictions": str(predictions)}
    tags = {**info, "wafer_fcn.run_kind": "nightly", "model_name": model_name, "model_version": str(model_version),
            **({"prefect.flow_run_id": flow_run_id} if flow_run_id else {})}
    run_id = client.create_run(experiment, run_name=f"nightly-{night}", tags=tags).info.run_id
    status = "FAILED"
    try:
        client.log_batch(run_id, params=[Param(k, v) for k, v in info.items()],
                         tags=[RunTag("mlflow.note.content", _note(night, wafers_scored, model, predictions))])
        log_night_metrics(client, run_id, night, pattern_counts=pattern_counts, pattern_rates=pattern_rates,
                          wafers=wafers, wafers_scored=wafers_scored, warnings=len(warnings))
        frame = worst_lots_first(lots)
        buffer = io.StringIO()
        frame.to_csv(buffer, index=False)
        client.log_text(run_id, buffer.getvalue(), "lots.csv")
        client.log_text(run_id, _lots_markdown(frame, night), "lots.md")
        if summary_markdown:
            client.log_text(run_id, summary_markdown, "summary.md")
        if pictures:
            log_files(client, run_id, pictures, artifact_path="pictures")
        status = "FINISHED"
    finally:
        end_run(client, run_id, status)
    return run_id


def _note(night: str, wafers_scored: int, model: str, predictions: str | os.PathLike) -> str:
    """The run's description (shown on its page): what this night was."""
    return (f"Nightly scoring of {night}: {wafers_scored:,} wafers scored with `{model}`. "
            f"Predictions: `{predictions}`. Recorded {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC.")
