"""The demo's training, without the pipeline: the staged cascade on the demo's synthetic splits.

Generates ``data.synth.n_wafers`` wafers and splits them by lot exactly as the training flow does
(``fcn_core.ingest.assign_splits``), trains every stage of ``stages_to_train`` with
``train_all_stages`` on the chosen device, then scores each stage's best checkpoint on the test
split. Prints seconds, wafers/s and test mean IU (fail dies) per stage; no Prefect, no MLflow.
Use it to time the cascade on another machine (``--device cuda``) or to try a config change
(``--set train.fcn8s.epochs=60``) before it goes into ``configs/``.

    python -m bench.cascade [--config default] [--device cpu|cuda] [--set key.path=value ...] [--tag NAME]
                            [--out DIR]   # keep the checkpoints in DIR/checkpoints/<stage>/ (default: a temp dir)
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow as pa
import pyarrow.compute as pc

from bench.common import base_parser, finish, machine_info, print_table, set_threads
from fcn_core.checkpoint import load_model
from fcn_core.config import Config, load_config
from fcn_core.data import WaferSet
from fcn_core.evaluate import evaluate
from fcn_core.ingest import assign_splits
from fcn_core.synth import generate_wafers
from fcn_core.train import stage_device, train_all_stages


def demo_splits(cfg: Config) -> dict[str, WaferSet]:
    """The training flow's synthetic data: generated wafers, split by lot with the config's salt."""
    table = generate_wafers(cfg.data.synth.n_wafers, seed=cfg.data.synth.seed, synth=cfg.data.synth,
                            classes=cfg.classes)
    split = assign_splits(table, cfg.data.split)
    out = {}
    for name in ("train", "val", "test"):
        part: pa.Table = table.filter(pc.equal(split, name))
        if part.num_rows == 0:
            raise SystemExit(f"the {name} split is empty: raise data.synth.n_wafers")
        out[name] = WaferSet.from_table(part)
    return out


def run_cascade(cfg: Config, out_dir: Path) -> list[dict]:
    sets = demo_splits(cfg)
    print(f"wafers: train {len(sets['train'])}, val {len(sets['val'])}, test {len(sets['test'])}", flush=True)
    t0 = time.perf_counter()
    results = train_all_stages(cfg, train_set=sets["train"], val_set=sets["val"], out_dir=out_dir, resume=False)
    wall = time.perf_counter() - t0
    device = stage_device(cfg)
    rows = []
    for stage, result in results.items():
        model, _ = load_model(result.best_checkpoint)
        scores = evaluate(model.to(device), sets["test"], n_classes=cfg.n_classes, device=device,
                          multiple=cfg.data.pad_multiple, fixed=cfg.data.pad_fixed)
        rows.append({"stage": stage, "epochs": len(result.history), "best_epoch": result.best_epoch + 1,
                     "train_s": round(result.seconds, 1), "wafers_per_s": round(result.wafers_per_s, 1),
                     "val_mean_iu": round(result.best_val_mean_iu, 4),
                     "test_mean_iu": round(scores.fail_only["mean_iu"], 4),
                     "test_pixel_acc": round(scores.fail_only["pixel_acc"], 4)})
    rows.append({"stage": "all (wall, incl. validation)", "train_s": round(wall, 1),
                 "epochs": sum(r["epochs"] for r in rows)})
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="default", help="config name or path")
    parser.add_argument("--device", default=None, help="train.device (default: the config's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="key.path=value override")
    parser.add_argument("--tag", default=None, help="results file bench/results/cascade-<tag>.json")
    parser.add_argument("--out", type=Path, default=None,
                        help="keep the checkpoints in OUT/checkpoints/<stage>/ (the layout of a flow run's folder)")
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)
    overrides = list(args.overrides) + ([f"train.device={args.device}"] if args.device else [])
    cfg = load_config(args.config, overrides)
    device = stage_device(cfg)
    payload: dict = {"machine": machine_info(), "threads": threads, "device": str(device), "config": args.config,
                     "overrides": overrides}
    if args.out is not None:
        payload["stages"] = run_cascade(cfg, args.out / "checkpoints")
    else:
        with tempfile.TemporaryDirectory(prefix="wafer-fcn-cascade-") as tmp:
            payload["stages"] = run_cascade(cfg, Path(tmp))
    print_table(f"cascade on {device} ({args.config}{' ' + ' '.join(overrides) if overrides else ''})",
                payload["stages"], ["stage", "epochs", "best_epoch", "train_s", "wafers_per_s", "val_mean_iu",
                                    "test_mean_iu"])
    tag = args.tag or f"{args.config}-{device.type}"
    return finish(f"cascade-{tag}", payload, results_dir=args.results_dir)


if __name__ == "__main__":
    main()
