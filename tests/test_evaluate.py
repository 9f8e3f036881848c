import numpy as np
import pytest
import torch
from torch import nn

from fcn_core.data import WaferSet
from fcn_core.evaluate import evaluate, results_markdown, write_report
from fcn_core.synth import generate_wafers
from fcn_core.table import FAIL


class OracleModel(nn.Module):
    """Returns the true labels as logits, looked up by the padded die map: a perfect model."""

    def __init__(self, wafers: WaferSet, n_classes: int = 5):
        super().__init__()
        self.lookup = {m.tobytes(): l for m, l in zip(wafers.die, wafers.label)}
        self.n_classes = n_classes

    def forward(self, x):
        die = x.argmax(1).to(torch.uint8).numpy()
        out = torch.zeros(x.shape[0], self.n_classes, *x.shape[-2:])
        for i in range(x.shape[0]):
            for key, label in self.lookup.items():
                h, w = label.shape
                if die[i, :h, :w].tobytes() == key:
                    out[i, :, :h, :w] = torch.nn.functional.one_hot(torch.from_numpy(label.astype(np.int64)),
                                                                    self.n_classes).permute(2, 0, 1).float()
                    break
        return out


@pytest.fixture(scope="module")
def wafers():
    return WaferSet.from_table(generate_wafers(24, seed=4))


def test_perfect_model_scores_one(wafers):
    s = evaluate(OracleModel(wafers), wafers, n_classes=5, batch_size=6)
    for group in (s.on_wafer, s.fail_only):
        assert group["pixel_acc"] == pytest.approx(1.0)
        assert group["mean_iu"] == pytest.approx(1.0)
    # confusion matrices count exactly the dies they should
    n_fail = sum(int((d == FAIL).sum()) for d in wafers.die)
    n_on = sum(int((d > 0).sum()) for d in wafers.die)
    assert s.hist_fail.sum() == n_fail and s.hist_on_wafer.sum() == n_on


def test_background_only_model_gets_background_right_only(wafers):
    class Zero(nn.Module):
        def forward(self, x):
            out = torch.zeros(x.shape[0], 5, *x.shape[-2:])
            out[:, 0] = 1
            return out
    s = evaluate(Zero(), wafers, n_classes=5)
    assert s.fail_only["iou"][0] > 0
    assert all(np.isnan(v) or v == 0 for v in s.fail_only["iou"][1:])  # patterns: never predicted
    assert s.on_wafer["pixel_acc"] > s.fail_only["pixel_acc"]  # pass dies are free points


def test_report_files(wafers, tmp_path):
    s = evaluate(OracleModel(wafers), wafers, n_classes=5)
    names = ["background", "ring", "scratch", "local zone", "circle"]
    paths = write_report({"fcn32s": s, "fcn8s": s}, tmp_path, class_names=names)
    md = open(paths["results_md"]).read()
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in md.splitlines()
            if line.startswith("| FCN-8s")]
    scores, iou = rows  # the seed's table (on-wafer and fail-dies scores), then per-class IoU
    assert scores[1] == "100.0" and len(scores) == 9 and len(iou) == 6 and "agrees with" in md
    assert open(paths["results_csv"]).read().startswith("model,")
    assert (tmp_path / "confusion_fcn8s.png").stat().st_size > 1000
    assert "FCN-32s" in results_markdown({"fcn32s": s}, class_names=names)
