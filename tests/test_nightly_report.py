"""The nightly report: each night on its own, newest first, worst lots first, rounded."""

from __future__ import annotations

import numpy as np
import pandas as pd

from fcn_core.nightly_report import Night, lot_rows, most_affected, nights_markdown
from fcn_core.nightly_summary import summarise_night

CLASSES = ["none", "ring", "scratch"]


def _preds(day: str, n: int, lots: list[str], ring: int) -> pd.DataFrame:
    return pd.DataFrame({"date": day, "lot_id": [lots[i * len(lots) // n] for i in range(n)],
                         "dominant_pattern": ["ring" if i < ring else "none" for i in range(n)],
                         "fail_dies": 10, "yield": 0.9,
                         "dies_ring": [8 if i < ring else 0 for i in range(n)], "dies_scratch": 0})


def _nights() -> list[Night]:
    old, new = _preds("2026-03-01", 30, ["A"], 3), _preds("2026-03-02", 40, ["B", "C"], 20)
    return [Night("2026-03-01", 30, summarise_night(old, old.iloc[:0], class_names=CLASSES)),
            Night("2026-03-02", 40, summarise_night(new, old, class_names=CLASSES))]


def test_the_newest_night_comes_first_and_nights_are_never_added_up():
    text = nights_markdown(_nights(), model="m/1", mlflow_run="abc", mlflow_url="http://ui/#/r/abc")
    assert text.startswith("# Nightly inference: night 2026-03-02\n")
    assert text.index("## 2026-03-02") < text.index("## 2026-03-01 (an earlier night")
    assert "40 wafers scored" in text and "30 wafers scored" in text and "70" not in text
    assert "MLflow run [abc](http://ui/#/r/abc)" in text
    assert "| ring | 20 | 50.0% |" in text  # the newest night's own share


def test_lot_rows_are_rounded_worst_first_with_short_columns():
    rows = lot_rows(_nights())
    assert [r["night"] for r in rows] == ["2026-03-02", "2026-03-02", "2026-03-01"]
    assert rows[0]["lot"] == "B" and rows[0]["lost_%"] > rows[1]["lost_%"]  # B holds the first 20 ring wafers
    assert set(rows[0]) == {"night", "lot", "wafers", "yield_%", "lost_%", "ring_%", "scratch_%"}
    assert all(v == round(v, 3) for r in rows for v in r.values() if isinstance(v, float))


def test_most_affected_wafers_have_the_highest_pattern_share():
    assert most_affected(np.array([1, 9, 0, 5]), np.array([10, 10, 0, 6]), n=2) == [1, 3]
