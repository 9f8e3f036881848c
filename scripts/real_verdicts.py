"""Real-map verdict scores of a training run's models, with and without the shape rules.

For each model (the cascade stages asked for and, when present, the fine-tuned one) and each
setting of ``verdict.min_elongation_by_class`` (the run's, and none), prints accuracy, macro-F1 and
per-label F1 on the scoring part of the run's wm811k-val, with the config's thresholds and with
thresholds calibrated on its calibration part (``calibrate_verdict``, as the flow does;
``fcn_core.real_split``). The README's
real-map table comes from this script.

    .venv/bin/python scripts/real_verdicts.py var/runs/<flow run id> [--stages fcn8s,fcn1s,finetune]
"""

from __future__ import annotations

import argparse
from pathlib import Path


import pandas as pd

from fcn_core.data import WaferSet
from fcn_core.scorer import scorer_from_checkpoint
from fcn_core.table import read_parquet
from fcn_core.verdicts import calibrate_verdict, real_eval_report, verdict_labels, verdicts_from_counts

CALIBRATION, SCORING = "wm811k-val_calibration", "wm811k-val_scoring"  # written by tasks.training.prepare_real_task


def score_model(checkpoint: Path, data_dir: Path) -> tuple[list[dict], list[str]]:
    scorer = scorer_from_checkpoint(checkpoint)
    cfg = scorer.cfg
    rows = []
    parts = {}
    for part in (CALIBRATION, SCORING):
        table = read_parquet(data_dir / f"{part}.parquet")
        wafers = WaferSet.from_table(table)
        parts[part] = (scorer.predict_maps(wafers.die), wafers.die, table.column("wafer_label").to_pylist())
    labels = verdict_labels(cfg.class_names)
    for rules in (cfg.verdict.min_elongation_by_class, {}):
        judge = scorer.with_verdict(cfg.verdict.model_copy(update={"min_elongation_by_class": dict(rules)}))
        cal_dies = judge.fail_die_counts(*parts[CALIBRATION][:2])
        calibrated, _ = calibrate_verdict(cal_dies, parts[CALIBRATION][2], class_names=cfg.class_names,
                                          source=f"{CALIBRATION}.parquet", min_elongation_by_class=dict(rules))
        hold_dies = judge.fail_die_counts(*parts[SCORING][:2])
        for name, verdict in (("config", judge.verdict), ("calibrated", calibrated)):
            verdicts = verdicts_from_counts(hold_dies, class_names=cfg.class_names, verdict=verdict)
            scores = real_eval_report(parts[SCORING][2], verdicts.dominant_pattern, labels=labels).scores
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
    if not (data_dir / f"{SCORING}.parquet").exists():
        raise SystemExit(f"{data_dir} has no {SCORING}.parquet: run a training with real maps (train.finetune)")
    rows, labels = [], []
    for stage in args.stages.split(","):
        checkpoint = args.run_dir / "checkpoints" / stage / "best.pt"
        if checkpoint.exists():
            stage_rows, labels = score_model(checkpoint, data_dir)
            rows += stage_rows
        else:
            print(f"skipped {stage}: no {checkpoint}")
    table = pd.DataFrame(rows, columns=["model", "shape rule", "thresholds", "accuracy", "macro_f1", "f1"])
    table.columns = [*table.columns[:4], "macro-F1", f"F1 {' / '.join(labels)}"]
    print(table.to_markdown(index=False, floatfmt=".3f"))
    print(f"\n{rows[0]['n'] if rows else 0} wafers of the scoring part scored")


if __name__ == "__main__":
    main()
