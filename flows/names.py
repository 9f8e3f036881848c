"""Prefect flow-run names: ``<config>-<YYYY-MM-DD>`` for trainings, the night for nightly runs,
``demo-<date>`` for demos (UTC dates), instead of Prefect's random ``spectacular-curassow``.

Each is a ``flow_run_name`` callable: Prefect calls it when the run starts, and it reads the run's
``params`` (a params model, or its dict form when the run came from a deployment).
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def today() -> str:
    """Today's date, UTC (``YYYY-MM-DD``)."""
    return datetime.now(timezone.utc).date().isoformat()


def _param(name: str, default: Any = None) -> Any:
    from prefect.runtime import flow_run

    params = flow_run.parameters.get("params")
    value = params.get(name) if isinstance(params, dict) else getattr(params, name, None)
    return default if value is None else value


def config_label(config: str) -> str:
    """``tiny`` for ``tiny``, ``configs/tiny.yaml`` or ``/abs/tiny.yml``."""
    return Path(config).stem if ("/" in config or Path(config).suffix in {".yaml", ".yml"}) else config


def training_run_name() -> str:
    """``<config>-<YYYY-MM-DD>``, e.g. ``tiny-2026-11-29``."""
    return f"{config_label(str(_param('config', 'default')))}-{today()}"


def nightly_run_name() -> str:
    """The night scored: the newest of ``params.dates``, else today (UTC)."""
    dates = _param("dates") or []
    return max(dates) if dates else today()


def demo_run_name() -> str:
    return f"demo-{today()}"
