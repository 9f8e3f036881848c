"""Evaluation as the seed's results table: the FCN paper's four scores, twice.

* on-wafer: every die on the wafer; pass dies are truth background and predicted background.
* fail dies only: the hard part, since pass dies are background by definition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch import nn

from fcn_core.config import Config
from fcn_core.data import WaferSet
from fcn_core.metrics import ConfusionMatrix, segmentation_scores
from fcn_core.inference.runtime import batch_labels, resolve_device
from fcn_core.table import PASS

if TYPE_CHECKING:
    import pyarrow as pa

    from fcn_core.scorer import Scorer
    from fcn_core.verdicts import RealEvalReport

SCORE_KEYS = ("pixel_acc", "mean_acc", "mean_iu", "fw_iu")
SCORE_HEADERS = ("pixel acc.", "mean acc.", "mean IU", "f.w. IU")
STAGE_TITLES = {"fcn32s": "FCN-32s", "fcn16s": "FCN-16s", "fcn8s": "FCN-8s", "fcn4s": "FCN-4s", "fcn2s": "FCN-2s",
                "fcn1s": "FCN-1s", "finetune": "fine-tuned on real maps"}
CASCADE = ("fcn32s", "fcn16s", "fcn8s", "fcn4s", "fcn2s", "fcn1s")


@dataclass
class EvalScores:
    on_wafer: dict
    fail_only: dict
    hist_on_wafer: np.ndarray
    hist_fail: np.ndarray
    n_wafers: int


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    wafers: WaferSet,
    *,
    n_classes: int,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    multiple: int = 32,
    fixed: int | None = None,
    tta: str = "none",
) -> EvalScores:
    """The FCN paper's four scores over on-wafer dies and over fail dies; ``tta`` as the model
    will be served (``model.tta`` of its config; :func:`fcn_core.inference.runtime.tta_scores`)."""
    wafers.require_labels("evaluation")
    device = resolve_device(device) if isinstance(device, str) else device
    was_training = model.training
    model.eval()
    on_wafer = ConfusionMatrix(n_classes, device=device)
    fail_only = ConfusionMatrix(n_classes, device=device)
    for _, batch in wafers.batches(batch_size=batch_size, multiple=multiple, fixed=fixed):
        pred = batch_labels(model, batch, device, tta=tta)
        target = batch.target.to(device)  # label on fail dies, IGNORE_INDEX elsewhere
        fail_only.update(pred, target)
        die = torch.as_tensor(batch.die).to(device)
        on_wafer.update(pred, torch.where(die == PASS, torch.zeros_like(target), target))
    model.train(was_training)
    hist_on, hist_fail = on_wafer.hist.cpu().numpy(), fail_only.hist.cpu().numpy()
    return EvalScores(
        on_wafer=segmentation_scores(hist_on),
        fail_only=segmentation_scores(hist_fail),
        hist_on_wafer=hist_on,
        hist_fail=hist_fail,
        n_wafers=len(wafers),
    )


def results_frame(scores_by_stage: dict[str, EvalScores], *, class_names: list[str]) -> pd.DataFrame:
    """One row per stage: the four scores on-wafer and on fail dies, plus per-class IoU (fail dies)."""
    rows = []
    for stage, s in scores_by_stage.items():
        row: dict[str, object] = {"model": STAGE_TITLES.get(stage, stage), "wafers": s.n_wafers}
        for key in SCORE_KEYS:
            row[f"{key}"] = s.on_wafer[key]
        for key in SCORE_KEYS:
            row[f"fail_{key}"] = s.fail_only[key]
        for name, iou in zip(class_names, s.fail_only["iou"]):
            row[f"iou_{name}"] = iou
        rows.append(row)
    return pd.DataFrame(rows)


def _pct(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def _pct_table(rows: dict[str, list[float]], headers: list[str]) -> str:
    """Markdown table: one row per model title, the values in % with one decimal ('n/a' when missing)."""
    frame = pd.DataFrame([[title, *map(_pct, values)] for title, values in rows.items()], columns=["model", *headers])
    return frame.to_markdown(index=False, disable_numparse=True, colalign=("left",) + ("right",) * len(headers))


def results_markdown(scores_by_stage: dict[str, EvalScores], *, class_names: list[str]) -> str:
    """The seed's table (scores in %), then per-class IoU, then whether 8s >= 16s >= 32s holds."""
    titles = {stage: STAGE_TITLES.get(stage, stage) for stage in scores_by_stage}
    scores = _pct_table({titles[st]: [s.on_wafer[k] for k in SCORE_KEYS] + [s.fail_only[k] for k in SCORE_KEYS]
                         for st, s in scores_by_stage.items()},
                        [*SCORE_HEADERS, *(f"{h} (fail dies)" for h in SCORE_HEADERS)])
    iou = _pct_table({titles[st]: list(s.fail_only["iou"]) for st, s in scores_by_stage.items()}, list(class_names))
    return "\n".join([scores, "", "Per-class IoU on fail dies (%):", "", iou, "", skip_order_sentence(scores_by_stage)]) + "\n"


def skip_order_sentence(scores_by_stage: dict[str, EvalScores]) -> str:
    """The paper finds 8s >= 16s >= 32s; say whether these wafers agree (fail-dies mean IU), and whether
    the finer stages (4s, 2s, 1s) carry the trend on."""
    order = [s for s in CASCADE if s in scores_by_stage]
    if len(order) < 2:
        return ""
    values = {s: scores_by_stage[s].fail_only["mean_iu"] for s in order}

    def rising(stages: list[str]) -> bool:
        return all(values[b] >= values[a] for a, b in zip(stages, stages[1:]))

    chain = " <= ".join(f"{STAGE_TITLES[s]} {_pct(values[s])}" for s in order)
    paper = [s for s in order if s in ("fcn32s", "fcn16s", "fcn8s")]
    sentence = f"Skip architecture (fail-dies mean IU): {chain}"
    if len(paper) >= 2:
        sentence += f"; this {'agrees with' if rising(paper) else 'does NOT agree with'} the paper's 8s >= 16s >= 32s"
    finer = [s for s in order if s not in ("fcn32s", "fcn16s")]
    if len(finer) >= 2 and finer[0] == "fcn8s":
        sentence += (", and the finer skips " + ("keep improving on" if rising(finer) else "do NOT all improve on")
                     + " FCN-8s")
    return sentence + "."


def write_report(
    scores_by_stage: dict[str, EvalScores], out_dir: str | Path, *, class_names: list[str],
    markdown: str | None = None,
) -> dict[str, str]:
    """results.md, results.csv, confusion_<stage>.png (fail dies) in ``out_dir``; returns the paths.

    ``markdown``: the text of results.md (``fcn_core.report.results_markdown``, with the real-map
    sections); default: the test-split tables alone."""
    from fcn_core.render import render_confusion

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results_md": out / "results.md", "results_csv": out / "results.csv"}
    paths["results_md"].write_text(markdown if markdown is not None
                                   else results_markdown(scores_by_stage, class_names=class_names))
    results_frame(scores_by_stage, class_names=class_names).to_csv(paths["results_csv"], index=False)
    for stage, s in scores_by_stage.items():
        p = out / f"confusion_{stage}.png"
        render_confusion(s.hist_fail, p, class_names=class_names)
        paths[f"confusion_{stage}"] = p
        np.savetxt(out / f"confusion_{stage}.csv", s.hist_fail, fmt="%d", delimiter=",",
                   header=",".join(class_names))
    return {k: str(v) for k, v in paths.items()}


@dataclass
class RealEvaluation:
    """Wafer-level verdicts of a model on real maps against the dataset's own wafer labels."""

    report: "RealEvalReport"
    wafer_ids: list[str]
    dataset_labels: list[str | None]
    predicted: list[str]
    pred_maps: list[np.ndarray]


def evaluate_real(
    scorer: "Scorer",
    table: "pa.Table",
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
) -> RealEvaluation:
    """Segment real maps, reduce each to a dominant pattern, score against ``wafer_label``.

    Labels map through ``fcn_core.verdicts.LABEL_MAP`` (Edge-Ring/Donut -> ring, Center -> circle,
    Edge-Loc/Loc -> local zone, Scratch -> scratch, None/Random -> none; Near-full excluded).
    ``pred_maps`` of the result are the maps after the scorer's shape rules (what is counted).
    """
    from fcn_core.verdicts import real_eval_report, verdict_labels

    wafers = WaferSet.from_table(table)
    preds = scorer.shaped_maps(scorer.predict_maps(wafers.die, batch_size=batch_size, device=device), wafers.die,
                               inplace=True)
    verdicts = scorer.verdicts(preds, wafers.die, shaped=True)
    labels = table.column("wafer_label").to_pylist()
    report = real_eval_report(labels, verdicts.dominant_pattern, labels=verdict_labels(scorer.class_names))
    return RealEvaluation(report=report, wafer_ids=wafers.wafer_ids, dataset_labels=labels,
                          predicted=list(verdicts.dominant_pattern), pred_maps=preds)


def write_real_report(real: RealEvaluation, table: "pa.Table", out_dir: str | Path, *, cfg: Config) -> dict[str, str]:
    """real_maps.md / real_maps.csv and a picture of typical misses (die map | prediction)."""
    from fcn_core.render import render_wafers
    from fcn_core.verdicts import map_dataset_label, miss_examples

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"real_md": out / "real_maps.md", "real_csv": out / "real_maps.csv"}
    paths["real_md"].write_text(real.report.markdown)
    real.report.table.to_csv(paths["real_csv"])
    true = [map_dataset_label(x) if x else None for x in real.dataset_labels]
    picks = [(t, p, idx[:2]) for t, p, idx in miss_examples(true, real.predicted, max_pairs=6, per_pair=2)]
    rows = [i for _, _, idx in picks for i in idx]
    if rows:
        die = [WaferSet.from_table(table.take([i])).die[0] for i in rows]
        titles = [f"{real.wafer_ids[i]}: {real.dataset_labels[i]} -> {real.predicted[i]}" for i in rows]
        paths["real_misses"] = render_wafers(die, out / "real_misses.png", classes=cfg.classes,
                                             predictions=[real.pred_maps[i] for i in rows], titles=titles, ncols=2)
    return {k: str(v) for k, v in paths.items()}
