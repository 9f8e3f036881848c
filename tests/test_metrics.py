import math

import numpy as np
import pytest
import torch

from fcn_core.metrics import ConfusionMatrix, segmentation_scores
from fcn_core.padding import IGNORE_INDEX

C = 5


def reference_scores(pred: np.ndarray, target: np.ndarray, n_classes: int) -> dict:
    """Independent, deliberately plain computation from the raw arrays (loops over classes)."""
    valid = (target >= 0) & (target < n_classes)
    p, t = pred[valid], target[valid]
    total = t.size
    acc, iou, freq = [], [], []
    for c in range(n_classes):
        in_truth = int(np.sum(t == c))
        in_pred = int(np.sum(p == c))
        hit = int(np.sum((t == c) & (p == c)))
        union = in_truth + in_pred - hit
        acc.append(hit / in_truth if in_truth else math.nan)
        iou.append(hit / union if union else math.nan)
        freq.append(in_truth / total)
    present_acc = [a for a in acc if not math.isnan(a)]
    present_iou = [v for v in iou if not math.isnan(v)]
    return {
        "pixel_acc": float(np.sum(p == t)) / total,
        "mean_acc": sum(present_acc) / len(present_acc),
        "mean_iu": sum(present_iou) / len(present_iou),
        "fw_iu": sum(f * v for f, v in zip(freq, iou) if f > 0),
        "iou": iou,
        "acc": acc,
    }


def random_batch(seed: int, shape=(4, 17, 23)) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 3 never occurs anywhere; class 4 only in predictions; ignored and out-of-range targets."""
    g = torch.Generator().manual_seed(seed)
    target = torch.tensor([0, 1, 2])[torch.randint(0, 3, shape, generator=g)]
    pred = torch.tensor([0, 1, 2, 4])[torch.randint(0, 4, shape, generator=g)]
    target[torch.rand(shape, generator=g) < 0.3] = IGNORE_INDEX
    target[torch.rand(shape, generator=g) < 0.05] = 7  # >= n_classes: skipped too
    return pred, target


def assert_scores_close(got: dict, want: dict) -> None:
    for key in ("pixel_acc", "mean_acc", "mean_iu", "fw_iu"):
        assert got[key] == pytest.approx(want[key], rel=1e-12), key
    for key in ("iou", "acc"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-12, equal_nan=True)


def test_scores_match_independent_computation_with_absent_classes() -> None:
    cm = ConfusionMatrix(C)
    preds, targets = zip(*(random_batch(s) for s in range(3)))
    for p, t in zip(preds, targets):
        cm.update(p, t)
    got = segmentation_scores(cm.hist)
    want = reference_scores(torch.cat([p.flatten() for p in preds]).numpy(),
                            torch.cat([t.flatten() for t in targets]).numpy(), C)
    assert_scores_close(got, want)
    assert math.isnan(got["iou"][3]) and math.isnan(got["acc"][3])  # absent everywhere: NaN, not 0
    assert got["iou"][4] == 0.0 and math.isnan(got["acc"][4])  # predicted only: IoU 0, no accuracy
    assert 0 < got["mean_iu"] < 1


def test_hist_counts_and_ignores() -> None:
    pred = torch.tensor([0, 1, 1, 2, 2, 0, 1])
    target = torch.tensor([0, 1, 2, 2, IGNORE_INDEX, 9, 0])
    cm = ConfusionMatrix(3).update(pred, target)
    assert cm.hist.dtype == torch.int64 and cm.hist.shape == (3, 3)
    assert cm.hist.tolist() == [[1, 1, 0], [0, 1, 0], [0, 1, 1]]  # rows = truth, columns = prediction
    s = segmentation_scores(cm.hist)
    assert s["pixel_acc"] == pytest.approx(3 / 5)
    assert s["acc"] == pytest.approx([1 / 2, 1.0, 1 / 2])
    assert s["iou"] == pytest.approx([1 / 2, 1 / 3, 1 / 2])
    assert s["mean_iu"] == pytest.approx(4 / 9)
    assert s["fw_iu"] == pytest.approx(2 / 5 * 1 / 2 + 1 / 5 * 1 / 3 + 2 / 5 * 1 / 2)


def test_streaming_merge_and_reset() -> None:
    pred, target = random_batch(11)
    whole = ConfusionMatrix(C).update(pred, target)
    first, second = ConfusionMatrix(C), ConfusionMatrix(C)
    first.update(pred[:2], target[:2])
    second.update(pred[2:].numpy(), target[2:].numpy())  # numpy input works too
    assert torch.equal(first.merge(second).hist, whole.hist)
    assert whole.hist.sum() == ((target >= 0) & (target < C)).sum()
    whole.reset()
    assert whole.hist.sum() == 0
    with pytest.raises(ValueError, match="merge"):
        first.merge(ConfusionMatrix(3))


def test_empty_matrix_scores_nan() -> None:
    s = ConfusionMatrix(C).scores()
    assert all(math.isnan(s[k]) for k in ("pixel_acc", "mean_acc", "mean_iu", "fw_iu"))
    assert all(math.isnan(v) for v in s["iou"] + s["acc"])


def test_update_rejects_bad_input() -> None:
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="differ in shape"):
        cm.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="outside 0..2"):
        cm.update(torch.tensor([3]), torch.tensor([1]))
    with pytest.raises(ValueError, match="class ids"):
        cm.update(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
    cm.update(torch.tensor([7]), torch.tensor([IGNORE_INDEX]))  # a bad pred on an ignored die is fine
    assert cm.hist.sum() == 0
    with pytest.raises(ValueError, match="square"):
        segmentation_scores(np.zeros((2, 3)))


def test_accumulates_on_requested_device() -> None:
    # a device other than the default one, so that ignoring the argument fails here on any machine
    assert ConfusionMatrix(C, device="meta").hist.device.type == "meta"
    if torch.cuda.is_available():  # on a GPU machine the counts stay on the GPU
        gpu = ConfusionMatrix(C, device="cuda").update(*random_batch(1))
        assert gpu.hist.device.type == "cuda"
        assert torch.equal(gpu.hist.cpu(), ConfusionMatrix(C).update(*random_batch(1)).hist)
