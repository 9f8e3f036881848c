"""What a nightly run shows a reader: each night it scored on its own, newest first, worst lots first.

Pure pandas over :class:`fcn_core.nightly_summary.NightSummary` (one per night), so a first run
that scores several nights (a fresh store) never adds them up into one "tonight".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fcn_core.nightly_summary import NightSummary

LOTS_SHOWN = 10  # lots per night in the Markdown (the table artifact has them all)


@dataclass(frozen=True)
class Night:
    """One night scored by this run: its date, the wafers newly scored and its summary."""

    date: str
    scored: int
    summary: NightSummary


def newest_first(nights: Sequence[Night]) -> list[Night]:
    return sorted(nights, key=lambda n: n.date, reverse=True)


def lots_worst_first(lots: pd.DataFrame) -> pd.DataFrame:
    """The lot table with ``loss_total`` (yield lost to all patterns), worst lot first."""
    loss = [c for c in lots.columns if str(c).startswith("loss_")]
    frame = lots.assign(loss_total=lots[loss].sum(axis=1) if loss else 0.0)
    return frame.sort_values(["loss_total", "lot_id"], ascending=[False, True], kind="stable").reset_index(drop=True)


def lot_rows(nights: Sequence[Night]) -> list[dict]:
    """The table artifact: one row per night and lot, newest night first, worst lot first; shares in
    percent rounded to 3 decimals, short column names (``yield_%``, ``lost_%``, ``<pattern>_%``)."""
    rows: list[dict] = []
    for night in newest_first(nights):
        frame = lots_worst_first(night.summary.yield_loss_by_lot)
        for record in frame.to_dict(orient="records"):
            row = {"night": night.date, "lot": record["lot_id"], "wafers": int(record["wafers"]),
                   "yield_%": _pct(record["mean_yield"]), "lost_%": _pct(record["loss_total"])}
            row.update({f"{k[5:]}_%": _pct(v) for k, v in record.items() if k.startswith("loss_") and k != "loss_total"})
            rows.append(row)
    return rows


def _pct(share: float) -> float | None:
    value = float(share)
    return round(100 * value, 3) if np.isfinite(value) else None


def nights_markdown(nights: Sequence[Night], *, model: str, flow_run: str | None = None,
                    mlflow_run: str | None = None, mlflow_url: str | None = None) -> str:
    """The Prefect Markdown artifact: the newest night first, then each earlier night this run scored."""
    ordered = newest_first(nights)
    if not ordered:
        return "# Nightly inference: nothing scored\n"
    newest = ordered[0]
    lines = [f"# Nightly inference: night {newest.date}", ""]
    where = [f"Model `{model}`"]
    if mlflow_run:
        where.append(f"MLflow run [{mlflow_run}]({mlflow_url})" if mlflow_url else f"MLflow run `{mlflow_run}`")
    if flow_run:
        where.append(f"flow run `{flow_run}`")
    lines.append("; ".join(where) + ".")
    if len(ordered) > 1:
        lines += ["", f"This run scored {len(ordered)} nights (e.g. the first run on a store); "
                      "each is reported on its own below, newest first: "
                  + ", ".join(f"{n.date} ({n.scored:,} wafers)" for n in ordered) + "."]
    for i, night in enumerate(ordered):
        lines += ["", *_night_section(night, earlier=i > 0)]
    return "\n".join(lines) + "\n"


def _night_section(night: Night, *, earlier: bool) -> list[str]:
    s = night.summary
    head = f"## {night.date}{' (an earlier night scored by this run)' if earlier else ''}"
    lines = [head, "", f"{night.scored:,} wafers scored ({s.wafers:,} in the partition)."]
    warnings = [w for w in s.warnings if w.startswith(night.date)]
    if warnings:
        lines += ["", "**Warnings**", ""] + [f"- **{w}**" for w in warnings]
    total = max(1, s.wafers)
    lines += ["", "| dominant pattern | wafers | share |", "| --- | ---: | ---: |"]
    for name, count in sorted(s.pattern_counts.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {name} | {count:,} | {100 * count / total:.1f}% |")
    lots = lots_worst_first(s.yield_loss_by_lot)
    if not lots.empty:
        loss = [c for c in lots.columns if c.startswith("loss_") and c != "loss_total"]
        shown = lots.head(LOTS_SHOWN)
        more = f" (the {LOTS_SHOWN} worst of {len(lots)}; all in the table artifact)" if len(lots) > LOTS_SHOWN else ""
        lines += ["", f"Lots, worst first{more}: mean yield and the yield lost to each pattern "
                      "(% of on-wafer dies)", "",
                  "| lot | wafers | yield | lost | " + " | ".join(c[5:] for c in loss) + " |",
                  "| --- | ---: | ---: | ---: |" + " ---: |" * len(loss)]
        for d in shown.to_dict(orient="records"):
            cells = " | ".join(f"{100 * d[c]:.2f}" for c in loss)
            lines.append(f"| {d['lot_id']} | {int(d['wafers'])} | {100 * d['mean_yield']:.1f}% | "
                         f"{100 * d['loss_total']:.2f} | {cells} |")
    return lines


def most_affected(pattern_dies: np.ndarray, on_wafer_dies: np.ndarray, n: int = 8) -> list[int]:
    """Indices of the ``n`` wafers with the highest share of on-wafer dies in a pattern, highest first."""
    share = np.divide(pattern_dies, on_wafer_dies, out=np.zeros(len(pattern_dies)), where=on_wafer_dies > 0)
    return [int(i) for i in np.argsort(-share, kind="stable")[:n]]
