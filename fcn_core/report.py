"""Typed results of one training, and the one function that turns them into results.md.

The train-fcn flow passes these between its tasks (Prefect serialises pydantic models) and
returns them; the flow's Prefect artifacts and the CLI print are made from the same objects, so
no layer re-reads a file or a dict path to recover a result.
"""

from __future__ import annotations

import math
from pathlib import Path

from pydantic import BaseModel, Field



class StageOutcome(BaseModel):
    """One trained stage: its checkpoints, validation score and history, and the scorer bundle built
    from its best checkpoint (what is evaluated and registered)."""

    stage: str
    best_checkpoint: str
    last_checkpoint: str
    best_epoch: int
    best_val_mean_iu: float
    history: list[dict] = Field(default_factory=list)
    seconds: float = 0.0
    wafers_per_s: float = 0.0
    scorer: str | None = None  # path of the scorer bundle, set once built (or calibrated)

    def ranking_score(self) -> float:
        """The validation mean IU (fail dies), -inf when missing, for choosing the stage to register."""
        score = self.best_val_mean_iu
        return score if score is not None and math.isfinite(score) else -math.inf


class StageScores(BaseModel):
    """The FCN paper's four scores on the test split, on-wafer and on fail dies (plus per-class IoU)."""

    on_wafer: dict[str, float | list[float]]
    fail_only: dict[str, float | list[float]]
    n_wafers: int

    @property
    def fail_mean_iu(self) -> float:
        return float(self.fail_only["mean_iu"])


# The headline figures of issue #13, one column each in results.md's summary of the real maps.
REAL_HEADLINES: dict[str, str] = {
    "wm811k_accuracy": "WM-811K accuracy",
    "wm811k_macro_f1": "WM-811K macro-F1",
    "wm811k_die_purity": "WM-811K die purity",
    "wm811k_false_alarm_share": "WM-811K false-alarm share",
    "mixed_exact_match": "MixedWM38 exact-set match",
    "mixed_macro_f1": "MixedWM38 macro-F1",
}


class RealMapsReport(BaseModel):
    """One stage on the held-out real maps (a section of results.md): WM-811K wafer verdicts, die
    purity and false alarms; MixedWM38 multi-label ``patterns`` scores."""

    stage: str
    title: str
    source: str  # the file names of the real maps scored
    n_wafers: int
    thresholds: str  # the verdict rules used, in words
    markdown: str  # the reports' tables
    # flat {name: value}: wm811k_accuracy, wm811k_macro_f1, wm811k_die_purity, wm811k_false_alarm_share,
    # mixed_exact_match, mixed_macro_f1, mixed_f1_<pattern>, ... (logged as real_<name> by tracking.scores)
    metrics: dict[str, float | None]

    def section(self) -> str:
        return (f"\n## {self.title} ({self.source}, {self.n_wafers:,} wafers)\n\n{self.thresholds}\n\n"
                f"{self.markdown}\n")


class Evaluation(BaseModel):
    """Every stage scored on the test split, the stage to register, and the real-map verdicts."""

    model_stage: str
    scores: dict[str, StageScores]
    test_markdown: str  # the seed's results table, per-class IoU and the skip-order sentence
    rows: list[dict]  # the results table as records (Prefect table artifact)
    paths: dict[str, str]  # written files: results_md, results_csv, confusion_*, overlay, curves, real_*
    real: list[RealMapsReport] = Field(default_factory=list)

    def fail_mean_iu(self, stage: str) -> float:
        return self.scores[stage].fail_mean_iu

    @property
    def real_by_stage(self) -> dict[str, dict[str, float | None]]:
        return {r.stage: r.metrics for r in self.real}

    @property
    def results_md(self) -> Path:
        return Path(self.paths["results_md"])

    def markdown(self) -> str:
        """The text of results.md."""
        return results_markdown(self.test_markdown, self.real)


def real_summary(real: list[RealMapsReport]) -> str:
    """One row per stage, one column per headline figure of the held-out real maps ('' when none)."""
    columns = [k for k in REAL_HEADLINES if any(r.metrics.get(k) is not None for r in real)]
    if not columns:
        return ""

    def cell(value: float | None) -> str:
        return "" if value is None or not math.isfinite(value) else f"{value:.3f}"
    head = "| model | " + " | ".join(REAL_HEADLINES[k] for k in columns) + " |"
    rule = "| --- |" + " ---: |" * len(columns)
    rows = [f"| {r.stage} | " + " | ".join(cell(r.metrics.get(k)) for k in columns) + " |" for r in real]
    return "\n## Held-out real maps (scoring parts)\n\n" + "\n".join([head, rule, *rows]) + "\n"


def results_markdown(test_markdown: str, real: list[RealMapsReport]) -> str:
    """results.md: the test-split tables, the real-map headline figures per stage, then one section
    per stage scored on real maps."""
    return test_markdown + real_summary(real) + "".join(r.section() for r in real)
