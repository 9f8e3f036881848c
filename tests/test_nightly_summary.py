import math

import pandas as pd
import pytest

from fcn_core.nightly_summary import (
    JumpRule,
    pattern_rates,
    summarise_night,
    trailing_window,
    yield_loss_by_lot,
)

CLASSES = ["background", "ring", "scratch", "local zone", "circle"]


def frame(date: str, dominant: list[str], *, lot: str = "L1", fail: int = 10, ring: int = 0,
          yield_: float = 0.8) -> pd.DataFrame:
    n = len(dominant)
    return pd.DataFrame({
        "date": [date] * n, "lot_id": [lot] * n, "dominant_pattern": dominant,
        "fail_dies": [fail] * n, "yield": [yield_] * n,
        "dies_ring": [ring] * n, "dies_scratch": [0] * n, "dies_local_zone": [0] * n, "dies_circle": [0] * n,
    })


def test_yield_loss_is_pattern_share_of_on_wafer_dies_per_lot():
    # wafer: 50 on-wafer dies, 10 fail (yield 0.8), 5 of them ring -> 10% of the wafer lost to ring
    lots = pd.concat([frame("2026-01-01", ["ring"], lot="A", fail=10, ring=5, yield_=0.8),
                      frame("2026-01-01", ["none"], lot="A", fail=0, ring=0, yield_=1.0),
                      frame("2026-01-01", ["ring"], lot=None, fail=4, ring=4, yield_=0.9)], ignore_index=True)
    out = yield_loss_by_lot(lots, CLASSES).set_index("lot_id")
    assert out.loc["A", "wafers"] == 2
    assert out.loc["A", "loss_ring"] == pytest.approx((0.1 + 0.0) / 2)
    assert out.loc["A", "mean_yield"] == pytest.approx(0.9)
    assert out.loc["(no lot)", "loss_ring"] == pytest.approx(0.1)
    assert out.loc["A", "loss_scratch"] == 0.0
    assert {"loss_local zone", "loss_circle"} <= set(out.columns)


def test_pattern_rates_count_dominant_patterns_per_date():
    df = pd.concat([frame("d1", ["ring", "ring", "none", "scratch"]), frame("d2", ["none"])], ignore_index=True)
    rates = pattern_rates(df, ["ring", "scratch"]).set_index(["date", "pattern"])
    assert rates.loc[("d1", "ring"), "rate"] == 0.5
    assert rates.loc[("d1", "scratch"), "count"] == 1
    assert rates.loc[("d2", "ring"), "rate"] == 0.0
    assert rates.loc[("d2", "ring"), "wafers"] == 1


def test_trailing_window_is_the_seven_days_before():
    assert trailing_window("2026-03-01") == [f"2026-02-{d}" for d in range(22, 29)]  # 22..28 Feb
    assert len(trailing_window("2026-03-01", days=3)) == 3


def test_a_jump_versus_the_trailing_week_warns_and_a_steady_rate_does_not():
    history = pd.concat([frame(f"2026-01-0{d}", ["ring"] * 2 + ["none"] * 18) for d in range(1, 8)],
                        ignore_index=True)  # ring on 10% of wafers all week
    jump = frame("2026-01-08", ["ring"] * 8 + ["none"] * 12)  # 40% tonight
    summary = summarise_night(jump, history, class_names=CLASSES, rule=JumpRule(factor=2, min_increase=0.05,
                                                                                 min_wafers=20))
    assert len(summary.warnings) == 1 and "'ring'" in summary.warnings[0] and "2026-01-08" in summary.warnings[0]
    row = summary.rates.set_index("pattern").loc["ring"]
    assert row["rate"] == pytest.approx(0.4) and row["trailing_rate"] == pytest.approx(0.1)
    assert summary.pattern_counts["ring"] == 8 and summary.pattern_counts["none"] == 12
    assert summary.wafers_scored == 20

    steady = frame("2026-01-08", ["ring"] * 2 + ["none"] * 18)
    assert summarise_night(steady, history, class_names=CLASSES).warnings == []
    # too few wafers to judge: no warning however big the jump
    tiny = frame("2026-01-08", ["ring"] * 5)
    assert summarise_night(tiny, history, class_names=CLASSES).warnings == []


def test_no_history_gives_nan_trailing_rate_and_no_warning():
    tonight = frame("2026-01-08", ["scratch"] * 30)
    summary = summarise_night(tonight, pd.DataFrame(), class_names=CLASSES)
    assert summary.warnings == []
    assert math.isnan(summary.rates.set_index("pattern").loc["scratch", "trailing_rate"])


def test_markdown_lists_counts_lots_and_warnings():
    history = pd.concat([frame(f"2026-01-0{d}", ["none"] * 20) for d in range(1, 8)], ignore_index=True)
    tonight = frame("2026-01-08", ["ring"] * 10 + ["none"] * 10, lot="LOT-7", ring=5)
    md = summarise_night(tonight, history, class_names=CLASSES, wafers_scored=20).to_markdown(
        model="wafer-fcn/3", flow_run="abc")
    assert "20 wafers scored" in md and "wafer-fcn/3" in md and "LOT-7" in md
    assert "## Warnings" in md and "'ring' on 50.0% of wafers" in md
