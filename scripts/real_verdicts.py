"""Real-map verdict scores of a training run's models, with and without the shape rules.

For each model (the cascade stages asked for and, when present, the fine-tuned one) and each
setting of ``verdict.min_elongation_by_class`` (the run's, and none), prints accuracy, macro-F1 and
per-label F1 on the run's held-out real maps, with the config's thresholds and with thresholds
calibrated on the run's fine-tune part (``calibrate_verdict``, as the flow does). The README's
real-map table comes from this script.

    .venv/bin/python scripts/real_verdicts.py var/runs/<flow run id> [--stages fcn8s,fcn1s,finetune]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fcn_core.checkpoint import load_model
from fcn_core.config import Config, VerdictConfig
from fcn_core.data import WaferSet
from fcn_core.predict import predict_maps
from fcn_core.table import read_parquet
from fcn_core.verdicts import (calibrate_verdict, count_fail_dies, real_eval_report, shaped_maps, verdict_labels,
                               verdicts_from_counts)


def fail_die_counts(preds: list[np.ndarray], die: list[np.ndarray], cfg: Config, rule: VerdictConfig) -> np.ndarray:
    shaped = shaped_maps(preds, die, class_names=cfg.class_names, verdict=rule)
    return count_fail_dies(shaped, die, n_classes=cfg.n_classes)


def score_model(checkpoint: Path, data_dir: Path) -> tuple[list[dict], list[str]]:
    model, cfg = load_model(checkpoint)
    rows = []
    parts = {}
    for part in ("real_finetune", "real_holdout"):
        table = read_parquet(data_dir / f"{part}.parquet")
        wafers = WaferSet.from_table(table)
        preds = predict_maps(model, wafers.die, multiple=cfg.data.pad_multiple, fixed=cfg.data.pad_fixed)
        parts[part] = (preds, wafers.die, table.column("wafer_label").to_pylist())
    labels = verdict_labels(cfg.class_names)
    for rules in (cfg.verdict.min_elongation_by_class, {}):
        rule = cfg.verdict.model_copy(update={"min_elongation_by_class": dict(rules)})
        cal_dies = fail_die_counts(*parts["real_finetune"][:2], cfg, rule)
        calibrated, _ = calibrate_verdict(cal_dies, parts["real_finetune"][2], class_names=cfg.class_names,
                                          source="real_finetune.parquet", min_elongation_by_class=dict(rules))
        hold_dies = fail_die_counts(*parts["real_holdout"][:2], cfg, rule)
        for name, verdict in (("config", rule), ("calibrated", calibrated)):
            verdicts = verdicts_from_counts(hold_dies, class_names=cfg.class_names, verdict=verdict)
            scores = real_eval_report(parts["real_holdout"][2], verdicts.dominant_pattern, labels=labels).scores
            rows.append({"model": checkpoint.parent.name, "shape rule": _rule_text(rules), "thresholds": name,
                         "n": scores["n"], "accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"],
                         "f1": " / ".join(f"{scores['per_label'][x]['f1']:.2f}" for x in labels)})
    return rows, labels


def _rule_text(rules: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(rules.items())) or "none"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="var/runs/<flow run id> of a training with real maps")
    parser.add_argument("--stages", default="fcn8s,fcn1s,finetune", help="checkpoint folders to score")
    args = parser.parse_args(argv)
    data_dir = args.run_dir / "data"
    if not (data_dir / "real_holdout.parquet").exists():
        raise SystemExit(f"{data_dir} has no real_holdout.parquet: run a training with real maps (train.finetune)")
    rows, labels = [], []
    for stage in args.stages.split(","):
        checkpoint = args.run_dir / "checkpoints" / stage / "best.pt"
        if checkpoint.exists():
            stage_rows, labels = score_model(checkpoint, data_dir)
            rows += stage_rows
        else:
            print(f"skipped {stage}: no {checkpoint}")
    print(f"| model | shape rule | thresholds | accuracy | macro-F1 | F1 {' / '.join(labels)} |")
    print("| --- | --- | --- | ---: | ---: | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['shape rule']} | {r['thresholds']} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} "
              f"| {r['f1']} |")
    print(f"\n{rows[0]['n'] if rows else 0} held-out wafers scored")


if __name__ == "__main__":
    main()
