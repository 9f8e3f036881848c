"""Training tasks of the train-fcn flow: one task run per FCN stage, evaluation, registration.

Each task takes the typed ``Config`` and rebuilds what it needs from paths (the split snapshots,
the checkpoints); it logs to MLflow through this process's one client for the config's store
(``tracking.store.client``) and an explicit run id, so it runs the same in a worker thread, a
Dask worker or another process. Results are typed (``fcn_core.report``), never dicts. No retries
on training: a failed epoch is a bug or bad data, and re-running the stage resumes from its last
checkpoint anyway.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from fcn_core.config import Config, real_table_path
from fcn_core.data import WaferSet
from fcn_core.evaluate import STAGE_TITLES, EvalScores, evaluate, evaluate_real, results_frame, write_report
from fcn_core.evaluate import results_markdown as test_markdown
from fcn_core.report import Evaluation, RealMapsReport, StageOutcome, StageScores, results_markdown
from fcn_core.inference.runtime import resolve_device
from fcn_core.overlay import OverlayPick, pick_overlay_wafers
from fcn_core.render import render_curves, render_wafers
from fcn_core.scorer import SCORER_FILE, Scorer, load_scorer, save_scorer, scorer_from_checkpoint
from fcn_core.table import FAIL, WAFER_COLUMNS, WAFER_SCHEMA, read_parquet, write_parquet_atomic
from fcn_core.real_split import check_trainable, split_held_out
from fcn_core.train import train_stage
from fcn_core.validate import validate_table
from fcn_core.verdicts import (dataset_patterns_string, die_metrics, die_purity, false_alarm_share, map_dataset_label,
                               miss_examples, multilabel_metrics, multilabel_scores)
from fcn_core.weak import LineSeed, pseudo_mask_table, wafer_label_table, weak_label_table
from fcn_core.weak_loss import WeakSet
from tracking import runs
from tracking import scores as tracking_scores
from tracking.registry import RegistrationResult, register_model
from tracking.store import RetryingClient, client

OVERLAY_PER_CLASS = 2  # test overlay: wafers drawn per pattern class
OVERLAY_WORST_MISSES = 4  # ... and wafers with the lowest fail-die accuracy


def _load_split(path: str) -> WaferSet:
    return WaferSet.from_table(read_parquet(path))


def _store(cfg: Config) -> RetryingClient:
    """This process's MLflow client for the config's store (the flow opened the store already)."""
    return client(cfg.tracking_uri)


def _finite(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(float(value)) else None


@task(name="train-stage", task_run_name="train-{stage}", cache_policy=NO_CACHE)
def train_stage_task(*, cfg: Config, stage: str, train_path: str, val_path: str, out_dir: str,
                     init_checkpoint: str | None, stage_run_id: str, weak_path: str | None = None) -> StageOutcome:
    """Train one FCN stage (resuming from its last checkpoint), logging epochs to ``stage_run_id``;
    with ``weak_path`` (real maps with wafer labels, and for ``weak_labels: both`` their pseudo-masks)
    jointly with them."""
    client = _store(cfg)
    weak_set = None if weak_path is None else WeakSet.from_table(read_parquet(weak_path), cfg.class_names)
    result = train_stage(cfg, stage=stage, train_set=_load_split(train_path), val_set=_load_split(val_path),
                         out_dir=out_dir, init_checkpoint=init_checkpoint, resume=True,
                         on_epoch=runs.epoch_logger(client, stage_run_id), progress=True, weak_set=weak_set)
    for key, value in (("best_val_fail_mean_iu", result.best_val_mean_iu), ("best_epoch", result.best_epoch),
                       ("train_seconds", result.seconds), ("train_wafers_per_s", result.wafers_per_s)):
        if (v := _finite(value)) is not None:
            client.log_metric(stage_run_id, key, v)
    get_run_logger().info("%s: best val mean IU (fail dies) %.4f at epoch %d, %.1f s, %.0f wafers/s", stage,
                          result.best_val_mean_iu, result.best_epoch + 1, result.seconds, result.wafers_per_s)
    return StageOutcome(**result.to_dict())


@task(name="prepare-real-maps", cache_policy=NO_CACHE)
def prepare_real_task(*, cfg: Config, train_path: str, out_dir: str) -> dict:
    """The one honest split of the real maps (docs/real-data.md), written into this run's data folder.

    Trains: only ``train.finetune.train_tables`` (the ``-train`` tables), weakly labelled. The held-out
    tables (``eval.real_data``: wm811k-val; ``eval.mixed_data``: mixedwm38-val) are never trained on:
    ``fcn_core.real_split.split_held_out`` cuts each into a calibration part (verdict thresholds) and a
    scoring part (reported figures). Returns paths (``train``: the fine-tune file, written here for
    ``all_fail_dies`` and by :func:`pseudo_label_task` for ``pseudo_masks``; ``weak_train``: for
    ``wafer_labels`` and ``both``, the real maps trained on beside the synthetic split; ``real_train``: the real
    training maps as read; ``real_calibration``/``real_scoring``; ``mixed_calibration``/``mixed_scoring``
    when the mixed table is there) and counts.
    """
    ft = cfg.train.finetune
    source = cfg.eval.real_data_path()
    train_sources = [real_table_path(name) for name in ft.train_tables]
    if not source or None in train_sources:
        missing = [n for n, p in zip(ft.train_tables, train_sources) if p is None]
        raise ValueError("train.finetune.enabled=true needs real labelled maps: "
                         + (f"train tables {missing} not found; " if missing else "")
                         + ("" if source else "eval.real_data is unset and wm811k-val.parquet is absent; ")
                         + "set WAFER_FCN_REAL_DATA or train.finetune.train_tables / eval.real_data")
    out = Path(out_dir)
    paths = {"train": str(out / "finetune_train.parquet"), "real_train": str(out / "real_train.parquet")}
    counts: dict[str, int] = {}
    quarantined = 0
    parts = []
    for path in train_sources:
        checked = validate_table(read_parquet(str(check_trainable(path))), n_classes=cfg.n_classes)
        parts.append(checked.valid)  # exactly WAFER_SCHEMA
        quarantined += checked.n_quarantined
    real_train = pa.concat_tables(parts)
    write_parquet_atomic(real_train, paths["real_train"])
    for name, held_path in (("real", source), ("mixed", cfg.eval.mixed_data_path())):
        if not held_path:
            continue
        checked = validate_table(read_parquet(held_path), n_classes=cfg.n_classes)
        quarantined += checked.n_quarantined
        split = split_held_out(checked.valid)
        for part in ("calibration", "scoring"):
            paths[f"{name}_{part}"] = str(out / f"{Path(held_path).stem}_{part}.parquet")
            write_parquet_atomic(getattr(split, part), paths[f"{name}_{part}"])
            counts[f"{name}_{part}"] = getattr(split, part).num_rows
    counts.update(real_train=real_train.num_rows, real_quarantined=quarantined)
    log = get_run_logger()
    if ft.weak_labels in ("wafer_labels", "both"):
        paths["weak_train"] = str(out / "weak_train.parquet")
        weak, report = wafer_label_table(real_train, class_names=cfg.class_names, max_per_class=ft.max_per_class,
                                         max_map_side=ft.max_map_side, seed=cfg.train.seed)
        write_parquet_atomic(weak, paths["weak_train"])
        counts["weak"] = weak.num_rows
        log.info("joint training set: %d real maps with wafer labels %s (dropped %s), beside the synthetic train "
                 "split", weak.num_rows, report.kept, report.dropped or "none")
    if ft.weak_labels == "all_fail_dies":
        weak, report = weak_label_table(real_train, class_names=cfg.class_names, max_per_class=ft.max_per_class,
                                        seed=cfg.train.seed)
        counts.update(_write_finetune_set(cfg, weak, train_path, paths["train"]))
        log.info("fine-tune set: %d real maps weakly labelled (all fail dies) %s (dropped %s), plus %d synthetic",
                 counts["weak"], report.kept, report.dropped or "none", counts["synthetic"])
    log.info("real maps: %d to train on from %s; held out (never trained on): %s", real_train.num_rows,
             ", ".join(Path(p).name for p in train_sources),
             ", ".join(f"{k} {v}" for k, v in counts.items() if k.endswith(("calibration", "scoring"))))
    return {"paths": paths, "counts": counts}


def _write_finetune_set(cfg: Config, weak: pa.Table, synthetic_path: str, dest: str) -> dict[str, int]:
    """The fine-tune train file: the weakly labelled real maps, plus the synthetic train split when
    ``mix_synthetic``."""
    parts = [weak]
    if cfg.train.finetune.mix_synthetic:
        parts.append(read_parquet(synthetic_path).select(WAFER_COLUMNS).cast(WAFER_SCHEMA))
    write_parquet_atomic(pa.concat_tables(parts), dest)
    return {"weak": weak.num_rows, "synthetic": parts[1].num_rows if len(parts) > 1 else 0}


@task(name="pseudo-masks", cache_policy=NO_CACHE)
def pseudo_label_task(*, cfg: Config, checkpoint: str, real_train_path: str, dest: str,
                      synthetic_path: str | None = None, stage_run_id: str | None = None) -> dict[str, int]:
    """Pseudo-masks from the model before the fine-tuning stage: its confident dies on the real
    training maps, restricted to each wafer's labelled patterns (``fcn_core.weak.pseudo_mask_table``);
    uncertain dies are ignored by the loss.

    ``weak_labels=pseudo_masks``: ``real_train_path`` is every real training map (capped here per
    pattern set) and ``dest`` the fine-tune file, with the synthetic split at ``synthetic_path``.
    ``weak_labels=both``: ``real_train_path`` is the joint stage's real half (``weak_train``, already
    picked), written to ``dest`` with its masks and nothing else. ``stage_run_id``: the stage's MLflow
    run gets the counts (``pseudo_maps``, ``pseudo_dies_background`` / ``_pattern`` / ``_ignored``)."""
    ft = cfg.train.finetune
    device = resolve_device(cfg.train.device)
    scorer = scorer_from_checkpoint(checkpoint, device=device)
    weak, report = pseudo_mask_table(read_parquet(real_train_path), scorer.model, class_names=cfg.class_names,
                                     min_prob=ft.pseudo_min_prob,
                                     line_seed=LineSeed.from_config(ft.pseudo_line_seed, cfg.class_names),
                                     max_per_class=ft.max_per_class if synthetic_path else None,
                                     seed=cfg.train.seed, device=device, multiple=scorer.pad_multiple,
                                     fixed=scorer.pad_fixed)
    if synthetic_path:
        counts = _write_finetune_set(cfg, weak, synthetic_path, dest)
    else:
        write_parquet_atomic(weak, dest)
        counts = {"weak": weak.num_rows, "synthetic": 0}
    get_run_logger().info("pseudo-masks: %d real maps %s (dropped %s; fail dies %s)%s", counts["weak"], report.kept,
                          report.dropped or "none", report.dies,
                          f", plus {counts['synthetic']} synthetic" if synthetic_path else "")
    if stage_run_id is not None:
        client = _store(cfg)
        for key, value in {"maps": counts["weak"], **{f"dies_{k}": v for k, v in report.dies.items()}}.items():
            client.log_metric(stage_run_id, f"pseudo_{key}", float(value))
    return {**counts, **{f"dies_{k}": v for k, v in report.dies.items()}}


@task(name="build-scorer", cache_policy=NO_CACHE)
def scorer_task(*, cfg: Config, checkpoint: str) -> str:
    """The scorer bundle of a trained stage judged by the config's verdict rules, beside its checkpoint."""
    return str(save_scorer(scorer_from_checkpoint(checkpoint, verdict=cfg.verdict),
                           Path(checkpoint).with_name(SCORER_FILE)))


@task(name="calibrate-verdicts", cache_policy=NO_CACHE)
def calibrate_task(*, cfg: Config, checkpoint: str, real_path: str, stage_run_id: str,
                   mixed_path: str | None = None) -> str:
    """Choose a model's verdict thresholds (min_dies, min_share, shared then per pattern) for the best
    wafer-level macro-F1 on ``real_path``, the calibration part of wm811k-val, and with ``mixed_path``
    (the calibration part of mixedwm38-val) at once for the best multi-label macro-F1 of ``patterns``
    there (the mean of both); never on a scoring part or a training map. Returns the path of a scorer
    bundle with them, beside the checkpoint (which is left as it is)."""
    device = resolve_device(cfg.train.device)
    real = read_parquet(real_path)
    base = scorer_from_checkpoint(checkpoint, device=device)
    single = (WaferSet.from_table(real).die, real.column("wafer_label").to_pylist())
    n_maps = real.num_rows
    if mixed_path is None:
        scorer, f1 = base.calibrated(*single, source=Path(real_path).name, device=device)
    else:
        mixed = read_parquet(mixed_path)
        scorer, f1 = base.calibrated_joint(single, (WaferSet.from_table(mixed).die,
                                                    mixed.column("wafer_label").to_pylist()),
                                           source=f"{Path(real_path).name} + {Path(mixed_path).name}", device=device)
        n_maps = real.num_rows + mixed.num_rows
    dest = save_scorer(scorer, Path(checkpoint).with_name(SCORER_FILE))
    verdict = scorer.verdict
    tracking_scores.log_calibration(_store(cfg), stage_run_id, verdict, f1, cfg.class_names)
    get_run_logger().info("verdict thresholds calibrated on %d real maps: %s (mean macro-F1 %.3f there; scores are "
                          "reported on the held-out maps only)", n_maps, verdict.describe(), f1)
    return str(dest)


def _stage_scores(s: EvalScores) -> StageScores:
    """JSON-friendly scores (no confusion matrices): for task results and artifacts."""
    def clean(d: dict) -> dict:
        return {k: [float(x) for x in v] if isinstance(v, (list, np.ndarray)) else float(v) for k, v in d.items()}
    return StageScores(on_wafer=clean(s.on_wafer), fail_only=clean(s.fail_only), n_wafers=int(s.n_wafers))


def _overlay(scorer: Scorer, test: WaferSet, path: Path, *, class_names: list[str], device) -> list[Path]:
    """Die map | truth | prediction of a few test wafers of every pattern class (by truth) and the worst
    misses (lowest fail-die accuracy), titled by why each is drawn; the picks also as ``<name>.json``."""
    preds = scorer.predict_maps(test.die, device=device)
    picks = pick_overlay_wafers(test.wafer_ids, test.die, test.label, preds, class_names=class_names,
                                per_class=OVERLAY_PER_CLASS, worst=OVERLAY_WORST_MISSES)
    if not picks:  # no labels and no fail dies: draw the first wafers rather than nothing
        picks = [OverlayPick(i, "first", None, None, test.wafer_ids[i]) for i in range(min(4, len(test)))]
    wafers = test.subset([p.index for p in picks])
    picture = render_wafers(wafers.die, path, classes=scorer.cfg.classes, label_maps=wafers.label,
                            predictions=[preds[p.index] for p in picks], titles=[p.title for p in picks], ncols=2)
    listing = path.with_suffix(".json")
    listing.write_text(json.dumps([{"wafer_id": test.wafer_ids[p.index], "reason": p.reason, "pattern": p.pattern,
                                    "fail_die_accuracy": p.fail_die_accuracy,
                                    "truth_patterns": _truth_patterns(test.label[p.index], class_names)}
                                   for p in picks], indent=1))
    return [picture, listing]


def _truth_patterns(label: np.ndarray | None, class_names: list[str]) -> list[str]:
    return [] if label is None else [class_names[c] for c in np.unique(label).tolist() if 0 < c < len(class_names)]


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_stages(*, cfg: Config, scorers: dict[str, str], test_path: str, out_dir: str,
                    histories: list[dict], parent_run_id: str, model_stage: str,
                    real_scoring: dict[str, str] | None = None, real_stages: list[str] | None = None) -> Evaluation:
    """The seed's results table for every stage on the test split, plus pictures, logged to the parent run.

    ``scorers``: the scorer bundle of each stage. The overlay picture shows ``model_stage`` (the
    stage that will be registered). Real maps are scored for ``real_stages`` (default:
    ``model_stage``) on the scoring parts of the held-out tables: ``real_scoring`` (``real``: WM-811K,
    ``mixed``: MixedWM38, as written by :func:`prepare_real_task`), by default cut here from
    ``eval.real_data`` / ``eval.mixed_data``. Files go to ``evaluation/real/<stage>/``. results.md is
    written once, from the returned :class:`Evaluation`.
    """
    client = _store(cfg)
    device = resolve_device(cfg.train.device)
    test = _load_split(test_path)
    scores: dict[str, EvalScores] = {}
    served = {stage: load_scorer(path, device=device) for stage, path in scorers.items()}
    for stage, scorer in served.items():
        scores[stage] = evaluate(scorer.model, test, n_classes=scorer.n_classes, device=device,
                                 multiple=scorer.pad_multiple, fixed=scorer.pad_fixed, tta=scorer.tta)
    out = Path(out_dir)
    held_out = _scoring_parts(cfg, real_scoring)
    real: list[RealMapsReport] = []
    real_paths: dict[str, str] = {}
    for stage in (real_stages or [model_stage]) if held_out else []:
        stage_paths, report = _evaluate_real_maps(cfg, served[stage], out / "real" / stage, stage=stage,
                                                  device=device, held_out=held_out)
        real.append(report)
        real_paths.update({f"real_{stage}_{k}": v for k, v in stage_paths.items()})
    tables = test_markdown(scores, class_names=cfg.class_names)
    paths = write_report(scores, out, class_names=cfg.class_names, markdown=results_markdown(tables, real))
    picture, listing = _overlay(served[model_stage], test, out / f"test_overlay_{model_stage}.png",
                                class_names=cfg.class_names, device=device)
    paths["overlay"], paths["overlay_wafers"] = str(picture), str(listing)
    if histories:
        paths["curves"] = str(render_curves(histories, out / "learning_curves.png"))
    paths.update(real_paths)
    runs.log_files(client, parent_run_id, list(paths.values()), artifact_path="evaluation")
    tracking_scores.log_test_scores(client, parent_run_id, scores)
    tracking_scores.log_real_scores(client, parent_run_id, {report.stage: report.metrics for report in real})
    rows = results_frame(scores, class_names=cfg.class_names).replace({np.nan: None}).to_dict(orient="records")
    return Evaluation(model_stage=model_stage, scores={k: _stage_scores(v) for k, v in scores.items()},
                      test_markdown=tables, rows=rows, paths=paths, real=real)


def _scoring_parts(cfg: Config, given: dict[str, str] | None) -> dict[str, tuple[str, pa.Table]]:
    """{'real' | 'mixed': (source name, scoring part)}: the files ``given``, else cut from the eval
    tables; ``eval.real_max_wafers`` keeps a seeded random sample of each (files are often sorted by
    label, so the first N would be one class)."""
    parts: dict[str, tuple[str, pa.Table]] = {}
    sources = given or {k: v for k, v in (("real", cfg.eval.real_data_path()), ("mixed", cfg.eval.mixed_data_path()))
                        if v}
    for name, path in sources.items():
        table = validate_table(read_parquet(path), n_classes=cfg.n_classes).valid
        if not given:
            table = split_held_out(table).scoring
        cap = cfg.eval.real_max_wafers
        if cap and cap < table.num_rows:
            table = table.take(np.sort(np.random.default_rng(0).choice(table.num_rows, cap, replace=False)))
        parts[name] = (Path(path).name if given else f"{Path(path).name}, scoring part", table)
    return parts


def _evaluate_real_maps(cfg: Config, scorer: Scorer, out: Path, *, stage: str, device,
                        held_out: dict[str, tuple[str, pa.Table]]) -> tuple[dict[str, str], RealMapsReport]:
    """One model on the held-out scoring parts: WM-811K wafer verdicts, die purity and false alarms;
    MixedWM38 multi-label ``patterns``; files named after the model in ``out``; the results.md section."""
    out.mkdir(parents=True, exist_ok=True)
    title = STAGE_TITLES.get(stage, stage)
    metrics: dict[str, float] = {}
    paths: dict[str, str] = {}
    sections: list[str] = []
    n_wafers = 0
    if "real" in held_out:
        source, table = held_out["real"]
        real = evaluate_real(scorer, table, device=device)
        labels = real.dataset_labels
        dies = scorer.fail_die_counts(real.pred_maps, WaferSet.from_table(table).die, shaped=True)
        purity = die_purity(dies, labels, class_names=scorer.class_names)
        alarms = false_alarm_share(dies, labels, class_names=scorer.class_names)
        metrics.update(real.report.metrics(prefix="wm811k_"))
        metrics.update(die_metrics(purity, alarms, prefix="wm811k_"))
        md = out / f"wm811k_{stage}.md"
        md.write_text(real.report.markdown + "\n" + _die_markdown(purity, alarms))
        real.report.table.to_csv(out / f"wm811k_{stage}.csv")
        paths.update(wm811k_md=str(md), wm811k_csv=str(out / f"wm811k_{stage}.csv"))
        truth = [map_dataset_label(x) for x in labels]
        if (png := _misses_picture(cfg, table, truth, real.predicted, real.pred_maps,
                                   out / f"wm811k_{stage}_misses.png")) is not None:
            paths["wm811k_misses"] = png
        sections.append(f"### WM-811K ({source}, {table.num_rows:,} wafers)\n\n{real.report.markdown}\n"
                        + _die_markdown(purity, alarms))
        n_wafers += table.num_rows
    if "mixed" in held_out:
        source, table = held_out["mixed"]
        die = WaferSet.from_table(table).die
        preds = scorer.shaped_maps(scorer.predict_maps(die, device=device), die, inplace=True)
        verdicts = scorer.verdicts(preds, die, shaped=True)
        labels = table.column("wafer_label").to_pylist()
        pattern_names = scorer.class_names[1:]
        scores = multilabel_scores(labels, verdicts.patterns, pattern_names=pattern_names)
        metrics.update(multilabel_metrics(scores, prefix="mixed_"))
        text = _multilabel_markdown(scores, source=source)
        md = out / f"mixedwm38_{stage}.md"
        md.write_text(text)
        paths["mixedwm38_md"] = str(md)
        truth = [dataset_patterns_string(x, pattern_names) for x in labels]
        if (png := _misses_picture(cfg, table, truth, verdicts.patterns, preds,
                                   out / f"mixedwm38_{stage}_misses.png")) is not None:
            paths["mixedwm38_misses"] = png
        sections.append(text)
        n_wafers += table.num_rows
    verdict = scorer.verdict
    thresholds = (f"Verdict thresholds: {verdict.describe()} ("
                  + (f"calibrated on {verdict.calibrated_on}" if verdict.calibrated_on else "config") + ").")
    get_run_logger().info("real maps, %s: %s", title, ", ".join(
        f"{k} {metrics[k]:.3f}" for k in ("wm811k_macro_f1", "wm811k_die_purity", "wm811k_false_alarm_share",
                                          "mixed_macro_f1", "mixed_exact_match") if k in metrics))
    sources = " + ".join(src for src, _ in held_out.values())
    return paths, RealMapsReport(stage=stage, title=f"Held-out real wafer maps: {title}", source=sources,
                                 n_wafers=n_wafers, thresholds=thresholds, markdown="\n".join(sections),
                                 metrics={k: float(v) for k, v in metrics.items()})


def _die_markdown(purity: dict, alarms: dict) -> str:
    rows = "\n".join(f"| {label} | {s['purity']:.3f} | {s['pattern_dies']:,} | {s['wafers']:,} |"
                     for label, s in purity["by_label"].items())
    return (f"Real die purity (of the fail dies given a pattern on one-pattern wafers, the share carrying the "
            f"wafer's own pattern): **{purity['purity']:.3f}** over {purity['pattern_dies']:,} dies of "
            f"{purity['wafers']:,} wafers. False-alarm share (fail dies given a pattern on None/Random wafers): "
            f"**{alarms['share']:.4f}** of {alarms['fail_dies']:,} dies; {alarms['wafers_with_pattern_dies']:.3f} "
            f"of those {alarms['wafers']:,} wafers have a pattern die.\n\n"
            f"| dataset label | die purity | pattern dies | wafers |\n| --- | ---: | ---: | ---: |\n{rows}\n")


def _multilabel_markdown(scores: dict, *, source: str) -> str:
    rows = "\n".join(f"| {name} | {s['precision']:.3f} | {s['recall']:.3f} | {s['f1']:.3f} | {s['support']:,} | "
                     f"{s['predicted']:,} |" for name, s in scores["per_pattern"].items())
    excluded = ", ".join(f"{k} {v}" for k, v in scores["excluded"].items()) or "none"
    return (f"### MixedWM38 ({source}, {scores['n']:,} wafers scored; left out: {excluded})\n\n"
            f"Multi-label verdict (`patterns`): exact-set match **{scores['exact_match']:.3f}**, macro-F1 "
            f"**{scores['macro_f1']:.3f}**.\n\n| pattern | precision | recall | F1 | wafers with it | "
            f"predicted |\n| --- | ---: | ---: | ---: | ---: | ---: |\n{rows}\n")


def _misses_picture(cfg: Config, table: pa.Table, truth: list[str | None], predicted: list[str],
                    pred_maps: list[np.ndarray], path: Path) -> str | None:
    """Die map | prediction of the most frequent (truth, verdict) confusions, two wafers each."""
    rows = [i for _, _, idx in miss_examples(truth, predicted, max_pairs=6, per_pair=2) for i in idx]
    if not rows:
        return None
    wafers = WaferSet.from_table(table.take(rows))
    titles = [f"{wafers.wafer_ids[j]}: {truth[i]} -> {predicted[i]}" for j, i in enumerate(rows)]
    return str(render_wafers(wafers.die, path, classes=cfg.classes, predictions=[pred_maps[i] for i in rows],
                             titles=titles, ncols=2))


@task(name="register", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10)
def register_task(*, cfg: Config, parent_run_id: str, scorer_path: str, candidate_score: float,
                  test_path: str, stage: str) -> RegistrationResult:
    """Log and register the scorer bundle at ``scorer_path`` (its verdict rules go with it);
    ``champion`` moves only as ``fcn_core.promotion.decide`` says (at least the re-scored champion);
    ``stage`` (e.g. ``fcn1s``) goes into the version's description and tags.

    Retried: it talks to the tracking server and the artifact store. A retry after a partial
    registration may add one more version, which the alias policy handles like any other.
    """
    store = _store(cfg)
    test = _load_split(test_path)
    device = resolve_device(cfg.train.device)

    def rescore(scorer) -> float:
        return float(evaluate(scorer.model.to(device), test, n_classes=cfg.n_classes, device=device,
                              multiple=cfg.data.pad_multiple, fixed=cfg.data.pad_fixed,
                              tta=scorer.tta).fail_only["mean_iu"])

    result = register_model(cfg, client=store, run_id=parent_run_id, scorer_path=scorer_path,
                            candidate_score=candidate_score, rescore=rescore, stage=stage)
    log = get_run_logger()
    log.info("registered %s v%s as %s (candidate %.4f, champion %s): %s", result.name, result.version, result.alias,
             result.candidate_score, "n/a" if result.champion_score is None else f"{result.champion_score:.4f}",
             result.reason)
    if result.override:
        log.warning("override tracking.replace_unloadable_champion used: %s", result.reason)
    return result
