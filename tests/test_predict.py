import numpy as np
import pytest
import torch
from torch import nn

from fcn_core.config import load_config
from fcn_core.models import build_fcn
from fcn_core.predict import column_name, predict_maps, score_table
from fcn_core.synth import generate_wafers
from fcn_core.table import FAIL, die_maps


class ConstantModel(nn.Module):
    """Predicts one class everywhere: makes the masking rules easy to check."""

    def __init__(self, cls: int, n_classes: int = 5):
        super().__init__()
        self.cls, self.n_classes = cls, n_classes

    def forward(self, x):
        out = torch.zeros(x.shape[0], self.n_classes, *x.shape[-2:])
        out[:, self.cls] = 1.0
        return out


@pytest.fixture(scope="module")
def table():
    return generate_wafers(40, seed=11)


def test_predictions_keep_each_maps_size_and_order(table):
    maps = die_maps(table)
    model = build_fcn("fcn8s", n_classes=5, preset="compact", geometry="aligned").eval()
    preds = predict_maps(model, maps, batch_size=7)
    assert [p.shape for p in preds] == [m.shape for m in maps]
    assert all(p.dtype == np.uint8 for p in preds)
    # batching does not change the answer
    one_by_one = [predict_maps(model, [m], batch_size=1)[0] for m in maps[:5]]
    for a, b in zip(preds[:5], one_by_one):
        np.testing.assert_array_equal(a, b)


def test_only_fail_dies_carry_a_pattern(table):
    maps = die_maps(table)
    preds = predict_maps(ConstantModel(2), maps)
    for die, pred in zip(maps, preds):
        assert (pred[die != FAIL] == 0).all()
        assert (pred[die == FAIL] == 2).all()


def test_score_table_columns_and_counts(table):
    cfg = load_config("tiny")
    out = score_table(ConstantModel(1), table, cfg=cfg, model_name="wafer-fcn", model_version="7",
                      extra={"run_id": "abc"})
    assert out.num_rows == table.num_rows
    assert out.column("wafer_id").to_pylist() == table.column("wafer_id").to_pylist()
    fails = [int((m == FAIL).sum()) for m in die_maps(table)]
    assert out.column("fail_dies").to_pylist() == fails
    assert out.column(column_name("ring")).to_pylist() == fails
    assert out.column(column_name("local zone")).to_pylist() == [0] * table.num_rows
    assert set(out.column("dominant_pattern").to_pylist()) <= {"ring", "none"}
    assert out.column("model_version").to_pylist() == ["7"] * table.num_rows
    assert out.column("run_id").to_pylist() == ["abc"] * table.num_rows
    y = np.array(out.column("yield").to_pylist())
    assert ((0 <= y) & (y <= 1)).all()
    blob = out.column("pred_map")[0].as_py()
    h, w = table.column("height")[0].as_py(), table.column("width")[0].as_py()
    assert len(blob) == h * w
