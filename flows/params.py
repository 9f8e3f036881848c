"""Typed flow parameters. Prefect turns these pydantic models into the deployments' parameter
schemas, so the server rejects a bad run request before any worker picks it up."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fcn_core.config import Config, load_config

Override = str | int | float | bool | None | list | dict


class ConfigParams(BaseModel):
    """Which config to run: a name in configs/ (or a YAML path) plus ``key.path`` overrides."""

    model_config = ConfigDict(extra="forbid")

    config: str = Field("default", description="config name in configs/ (e.g. default, tiny) or a YAML path")
    overrides: dict[str, Override] | list[str] = Field(
        default_factory=dict,
        description='e.g. {"train.fcn32s.epochs": 2} or ["train.fcn32s.epochs=2"]',
    )

    def load(self) -> Config:
        """The validated config; a bad name or override fails the run here, with pydantic's message."""
        return load_config(self.config, self.overrides or None)


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


def as_dict(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json")
