"""The FCN paper's scores from a streaming confusion matrix.

``ConfusionMatrix`` accumulates on the model's device (one ``torch.bincount`` per batch, no copies to
the host); ``segmentation_scores`` turns the matrix into pixel accuracy, mean accuracy, mean IU and
frequency-weighted IU exactly as the paper's ``score.py`` does: means are ``nanmean`` over classes,
and a class absent from both truth and prediction scores NaN, not zero.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from fcn_core.padding import IGNORE_INDEX


class ConfusionMatrix:
    """``hist[t, p]`` counts dies of true class t predicted as p; targets outside 0..C-1 are skipped.

    That covers ``IGNORE_INDEX`` (pass dies, off-wafer, padding) and any other out-of-range target.
    """

    def __init__(self, n_classes: int, *, device: str | torch.device = "cpu") -> None:
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}")
        self.n_classes = n_classes
        self.device = torch.device(device)
        self.hist = torch.zeros(n_classes, n_classes, dtype=torch.int64, device=self.device)

    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> "ConfusionMatrix":
        """Add a batch of predicted class ids and targets (same shape, any layout)."""
        pred = torch.as_tensor(pred).to(self.device, non_blocking=True)
        target = torch.as_tensor(target).to(self.device, non_blocking=True)
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        if pred.dtype.is_floating_point:
            raise ValueError("pred must hold class ids (e.g. logits.argmax(1)), not scores")
        c = self.n_classes
        keep = (target >= 0) & (target < c)  # drops IGNORE_INDEX
        t, p = target[keep].long(), pred[keep].long()
        if p.numel() and bool(((p < 0) | (p >= c)).any()):
            raise ValueError(f"pred holds class ids outside 0..{c - 1}")
        self.hist += torch.bincount(t * c + p, minlength=c * c).view(c, c)
        return self

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add another matrix (e.g. from another worker or data shard)."""
        if other.n_classes != self.n_classes:
            raise ValueError(f"cannot merge {other.n_classes}-class into {self.n_classes}-class matrix")
        self.hist += other.hist.to(self.device)
        return self

    def reset(self) -> None:
        self.hist.zero_()

    def scores(self) -> dict[str, Any]:
        return segmentation_scores(self.hist)


def segmentation_scores(hist: torch.Tensor | np.ndarray) -> dict[str, Any]:
    """pixel_acc, mean_acc, mean_iu, fw_iu (floats) and per-class ``iou`` and ``acc`` lists.

    Per-class accuracy is NaN for a class absent from the truth; IoU is NaN for a class absent from
    both truth and prediction. Means skip NaNs; with no counted dies every score is NaN.
    """
    h = (hist.detach().cpu().numpy() if isinstance(hist, torch.Tensor) else np.asarray(hist)).astype(np.float64)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"hist must be a square (C, C) matrix, got shape {h.shape}")
    tp, truth, predicted, total = np.diag(h), h.sum(axis=1), h.sum(axis=0), h.sum()
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of an all-NaN slice -> NaN
        acc = tp / truth
        iou = tp / (truth + predicted - tp)
        freq = truth / total
        present = freq > 0
        return {
            "pixel_acc": float(tp.sum() / total),
            "mean_acc": float(np.nanmean(acc)),
            "mean_iu": float(np.nanmean(iou)),
            "fw_iu": float((freq[present] * iou[present]).sum()) if total > 0 else float("nan"),
            "iou": [float(v) for v in iou],
            "acc": [float(v) for v in acc],
        }


__all__ = ["ConfusionMatrix", "segmentation_scores", "IGNORE_INDEX"]
