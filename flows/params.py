"""Typed flow parameters. Prefect turns these pydantic models into the deployments' parameter
schemas, so the server rejects a bad run request before any worker picks it up.

A run started through the Prefect API (a deployment run) must not move where models come from or
where state lives: its guarded parameters (``GUARDED``) are refused unless the worker's
environment allow-lists them in ``WAFER_FCN_ALLOWED_OVERRIDES`` (docs/orchestration.md, Security).
Calling a flow function in-process (the CLI, tests) is the local user and is not restricted.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fcn_core.config import Config, load_config

Override = str | int | float | bool | None | list | dict

ALLOWED_OVERRIDES_ENV = "WAFER_FCN_ALLOWED_OVERRIDES"
# Config keys (and their sub-keys) that decide where models are loaded from, where state lives and
# which data elects the champion; run parameters that do the same; "config" stands for a YAML path.
GUARDED_KEYS: tuple[str, ...] = ("home", "tracking", "eval.real_data")
GUARDED_FIELDS: tuple[str, ...] = ("curated_root", "dask_address")
GUARDED = (*GUARDED_KEYS, *GUARDED_FIELDS, "config")


class OverrideNotAllowed(ValueError):
    """A run started through the API tried to change a guarded parameter."""


class ConfigParams(BaseModel):
    """Which config to run: a name in configs/ (or a YAML path) plus ``key.path`` overrides."""

    model_config = ConfigDict(extra="forbid")

    config: str = Field("default", description="config name in configs/ (e.g. default, tiny) or a YAML path")
    overrides: dict[str, Override] | list[str] = Field(
        default_factory=dict,
        description='e.g. {"train.fcn32s.epochs": 2} or ["train.fcn32s.epochs=2"]',
    )

    def load(self) -> Config:
        """The validated config; a bad name or override fails the run here, with pydantic's message.

        In a run started through the Prefect API, guarded parameters must be allow-listed first.
        """
        if started_through_api():
            check_allowed(self, allowed_overrides())
        return load_config(self.config, self.overrides or None)

    def guarded_changes(self) -> list[str]:
        """The guarded names this request sets (override keys, run parameters, a config path)."""
        keys = (self.overrides.keys() if isinstance(self.overrides, dict)
                else (item.split("=", 1)[0] for item in self.overrides))
        changed = [k.strip() for k in keys if _touches(k.strip(), GUARDED_KEYS)]
        changed += [name for name in GUARDED_FIELDS if getattr(self, name, None) is not None]
        if "/" in self.config or Path(self.config).suffix in {".yaml", ".yml"}:
            changed.append("config")
        return changed


def _touches(key: str, guarded: tuple[str, ...]) -> bool:
    """Does setting ``key`` set a guarded key, one below it, or a section holding one?"""
    return any(key == g or key.startswith(g + ".") or g.startswith(key + ".") for g in guarded)


def allowed_overrides(environ: dict[str, str] | None = None) -> set[str]:
    """The worker's allow-list: comma-separated names from GUARDED or their sub-keys; '*' allows all."""
    text = (os.environ if environ is None else environ).get(ALLOWED_OVERRIDES_ENV, "")
    return {item.strip() for item in text.split(",") if item.strip()}


def check_allowed(params: ConfigParams, allowed: set[str]) -> None:
    if "*" in allowed:
        return
    refused = [name for name in params.guarded_changes()
               if not any(name == a or name.startswith(a + ".") for a in allowed)]
    if refused:
        raise OverrideNotAllowed(
            f"run parameter(s) {', '.join(refused)} may change where models are loaded from or where state "
            f"lives; a run started through the API may set them only when the worker allows it "
            f"({ALLOWED_OVERRIDES_ENV}={','.join(refused)})")


def started_through_api() -> bool:
    """Is this flow run a deployment run (created through the Prefect API, executed by a worker)?"""
    from prefect.runtime import deployment

    return deployment.id is not None


class TrainParams(ConfigParams):
    source: str | None = Field(
        None,
        description="Parquet file, folder or pyarrow URI of wafer-table drops; None: data.source from the "
                    "config, and when that is empty too, synthesise data.synth wafers into <home>/drops",
    )
    gpu_limit: str = Field("gpu-0", description="Prefect global concurrency limit held while training")
    max_quarantined_share: float = Field(0.25, ge=0, le=1,
                                         description="fail the run if more of this run's rows are quarantined")


class NightlyParams(ConfigParams):
    source: str | None = Field(
        None, description="ingest these drops first (file, folder or URI; cached by content); None: score only "
                          "what is already curated")
    curated_root: str | None = Field(None, description="curated store; None: <home>/curated")
    dates: list[str] | None = Field(None, description="only these partitions (YYYY-MM-DD); None: all")
    task_runner: Literal["threads", "dask"] = Field(
        "threads", description="threads (in the flow process) or dask (fan score_partition out)")
    dask_address: str | None = Field(None, description="scheduler of an existing Dask cluster; None: local cluster")
    parallelism: int = Field(2, ge=1, description="threads, or local Dask workers")
    chunk_rows: int = Field(20_000, ge=1, description="wafers scored per chunk inside a partition")
    jump_factor: float = Field(2.0, ge=1, description="warn when a pattern's rate is >= this x the trailing week")
    jump_min_increase: float = Field(0.05, ge=0, le=1, description="...and at least this much higher (share)")
    jump_min_wafers: int = Field(20, ge=1, description="...with at least this many wafers on both sides")

    @field_validator("dates")
    @classmethod
    def _iso_dates(cls, dates: list[str] | None) -> list[str] | None:
        from datetime import date

        for d in dates or []:
            try:
                date.fromisoformat(d)
            except ValueError as exc:
                raise ValueError(f"dates: {d!r} is not YYYY-MM-DD") from exc
        return dates


class DemoParams(ConfigParams):
    night_wafers: int = Field(200, ge=1, description="wafers in tonight's synthetic drop")


def as_dict(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json")
