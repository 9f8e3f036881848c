"""The nightly-inference summary: what was scored, which patterns, what they cost, what jumped.

Pure pandas over predictions tables (the columns written by ``fcn_core.inference.products``), so
it is tested without Prefect; the flow turns the result into Markdown and table artifacts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date as Date
from datetime import timedelta

import numpy as np
import pandas as pd

from fcn_core.stages import NO_PATTERN
from fcn_core.verdicts import dies_column

TRAILING_DAYS = 7


@dataclass
class JumpRule:
    """Warn when a pattern's share of wafers on a night exceeds the trailing week's by both margins."""

    factor: float = 2.0  # tonight's rate >= factor x trailing rate ...
    min_increase: float = 0.05  # ... and at least this many points higher (absolute share)
    min_wafers: int = 20  # both windows need this many wafers to compare at all


@dataclass
class NightSummary:
    wafers_scored: int  # newly scored by this run
    wafers: int  # rows of the partitions this run touched (earlier rows of appended partitions too)
    dates: list[str]
    pattern_counts: dict[str, int]  # dominant pattern (or "none") -> wafers of those partitions
    yield_loss_by_lot: pd.DataFrame  # lot_id, wafers, mean_yield, loss_<pattern> (yield points)
    rates: pd.DataFrame  # date, pattern, rate, trailing_rate, wafers, trailing_wafers
    warnings: list[str] = field(default_factory=list)

    def to_markdown(self, *, model: str, flow_run: str | None = None) -> str:
        lines = [f"# Nightly inference: {self.wafers_scored} wafers scored",
                 "", f"Model `{model}`; partitions: {', '.join(self.dates) or 'none'} "
                     f"({self.wafers} wafers in all)."]
        if flow_run:
            lines.append(f"Flow run `{flow_run}`.")
        if self.warnings:
            lines += ["", "## Warnings", ""] + [f"- **{w}**" for w in self.warnings]
        lines += ["", "## Dominant patterns", "", "| pattern | wafers | share |", "| --- | ---: | ---: |"]
        total = max(1, self.wafers)
        for name, count in self.pattern_counts.items():
            lines.append(f"| {name} | {count} | {100 * count / total:.1f}% |")
        if not self.yield_loss_by_lot.empty:
            loss_cols = [c for c in self.yield_loss_by_lot.columns if c.startswith("loss_")]
            lines += ["", "## Yield loss by lot (mean points of yield lost to each pattern)", "",
                      "| lot | wafers | mean yield | " + " | ".join(c[5:] for c in loss_cols) + " |",
                      "| --- | ---: | ---: |" + " ---: |" * len(loss_cols)]
            for d in self.yield_loss_by_lot.to_dict(orient="records"):
                cells = " | ".join(f"{100 * d[c]:.2f}" for c in loss_cols)
                lines.append(f"| {d['lot_id']} | {d['wafers']} | {100 * d['mean_yield']:.1f}% | {cells} |")
        return "\n".join(lines) + "\n"


def pattern_columns(class_names: list[str]) -> dict[str, str]:
    """Pattern name -> its die-count column (background has none)."""
    return {name: dies_column(name) for name in class_names[1:]}


def yield_loss_by_lot(predictions: pd.DataFrame, class_names: list[str]) -> pd.DataFrame:
    """Per lot: wafers, mean yield, and the mean share of on-wafer dies lost to each pattern.

    A wafer's loss to a pattern is its pattern dies over its on-wafer dies; on-wafer dies are
    fail_dies / (1 - yield), so the loss is (pattern dies / fail dies) x (1 - yield).
    """
    columns = pattern_columns(class_names)
    if predictions.empty:
        return pd.DataFrame(columns=["lot_id", "wafers", "mean_yield", *(f"loss_{p}" for p in columns)])
    fail = predictions["fail_dies"].to_numpy(dtype=np.float64)
    lost = 1.0 - predictions["yield"].to_numpy(dtype=np.float64)
    frame = pd.DataFrame({"lot_id": predictions["lot_id"].fillna("(no lot)").to_numpy(),
                          "yield": predictions["yield"].to_numpy(dtype=np.float64)})
    for name, col in columns.items():
        dies = predictions[col].to_numpy(dtype=np.float64)
        frame[f"loss_{name}"] = np.divide(dies, fail, out=np.zeros_like(dies), where=fail > 0) * lost
    grouped = frame.groupby("lot_id", sort=True)
    out = grouped.mean()
    out.insert(0, "wafers", grouped.size())
    return out.rename(columns={"yield": "mean_yield"}).reset_index()


def pattern_rates(predictions: pd.DataFrame, patterns: list[str]) -> pd.DataFrame:
    """Per date and pattern: wafers and the share of them whose dominant pattern it is."""
    if predictions.empty:
        return pd.DataFrame(columns=["date", "pattern", "wafers", "count", "rate"])
    counts = pd.crosstab(predictions["date"], predictions["dominant_pattern"])
    counts = counts.reindex(columns=patterns, fill_value=0)
    wafers = predictions.groupby("date").size()
    long = counts.stack().rename("count").reset_index()
    long.columns = ["date", "pattern", "count"]
    long["wafers"] = long["date"].map(wafers)
    long["rate"] = long["count"] / long["wafers"]
    return long[["date", "pattern", "wafers", "count", "rate"]]


def trailing_window(day: str, days: int = TRAILING_DAYS) -> list[str]:
    """The ``days`` dates before ``day`` (ISO strings), oldest first."""
    d = Date.fromisoformat(day)
    return [(d - timedelta(days=k)).isoformat() for k in range(days, 0, -1)]


def summarise_night(
    tonight: pd.DataFrame,
    history: pd.DataFrame,
    *,
    class_names: list[str],
    rule: JumpRule | None = None,
    wafers_scored: int | None = None,
) -> NightSummary:
    """``tonight``: predictions of the partitions this run scored; ``history``: those of earlier dates.

    Both need a ``date`` column (the partition date). Each scored date is compared with the
    seven dates before it, so a backfill of several nights is judged night by night.
    """
    rule = rule or JumpRule()
    patterns = list(pattern_columns(class_names))
    dates = sorted(tonight["date"].unique().tolist()) if not tonight.empty else []
    counts = tonight["dominant_pattern"].value_counts() if not tonight.empty else pd.Series(dtype=int)
    pattern_counts = {name: int(counts.get(name, 0)) for name in [*patterns, NO_PATTERN]}

    everything = pd.concat([history, tonight], ignore_index=True) if not history.empty else tonight
    daily = pattern_rates(everything, patterns)
    rows, warnings = [], []
    for day in dates:
        window = daily[daily["date"].isin(trailing_window(day))]
        trailing_wafers = int(window.drop_duplicates("date")["wafers"].sum()) if not window.empty else 0
        for pattern in patterns:
            now = daily[(daily["date"] == day) & (daily["pattern"] == pattern)]
            wafers = int(now["wafers"].iloc[0]) if not now.empty else 0
            rate = float(now["rate"].iloc[0]) if not now.empty else 0.0
            past = window[window["pattern"] == pattern]
            trailing = float(past["count"].sum() / trailing_wafers) if trailing_wafers else float("nan")
            rows.append({"date": day, "pattern": pattern, "rate": rate, "trailing_rate": trailing,
                         "wafers": wafers, "trailing_wafers": trailing_wafers})
            if (wafers >= rule.min_wafers and trailing_wafers >= rule.min_wafers
                    and rate >= rule.factor * trailing and rate - trailing >= rule.min_increase):
                warnings.append(f"{day}: '{pattern}' on {100 * rate:.1f}% of wafers vs "
                                f"{100 * trailing:.1f}% over the trailing week ({trailing_wafers} wafers)")
    return NightSummary(
        wafers_scored=int(len(tonight)) if wafers_scored is None else int(wafers_scored),
        wafers=int(len(tonight)),
        dates=dates,
        pattern_counts=pattern_counts,
        yield_loss_by_lot=yield_loss_by_lot(tonight, class_names),
        rates=pd.DataFrame(rows, columns=["date", "pattern", "rate", "trailing_rate", "wafers", "trailing_wafers"]),
        warnings=warnings,
    )


def read_predictions(predictions_root: str, dates: list[str], *, class_names: list[str]) -> pd.DataFrame:
    """The summary's columns of the predictions files of ``dates`` that exist, plus ``date``."""
    import pyarrow.parquet as pq
    from pyarrow.fs import FileType

    from fcn_core.table import resolve_fs

    columns = ["lot_id", "dominant_pattern", "fail_dies", "yield", *pattern_columns(class_names).values()]
    frames = []
    for day in dates:
        fs, path = resolve_fs(f"{str(predictions_root).rstrip('/')}/date={day}/predictions.parquet")
        if fs.get_file_info(path).type != FileType.File:
            continue
        frame = pq.read_table(path, filesystem=fs, columns=columns).to_pandas()
        frame["date"] = day
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=[*columns, "date"])
    return pd.concat(frames, ignore_index=True)
