"""Aligned vs classic geometry of the compact FCN-8s: speed ratio and accuracy with equal budgets.

Both in fp32. ``classic`` is the seed's network (100-pixel margin on conv1_1, crops); ``aligned`` uses 'same'
padding. Speed: model-only scoring of real maps and of 64 x 64 maps. Accuracy: one staged training
per geometry (FCN-8s from scratch, see bench.trained) with the same wafers, epochs, learning rate
and seed, scored on the same synthetic test split.

    python -m bench.geometry [--n-train 2000 --epochs 8 --n-test 600 --real-sample 400]
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.common import (CACHE_DIR, base_parser, machine_info, padded_gflops, print_table, real_table, save_results,
                          set_threads, synthetic_64, time_best)
from bench.trained import Budget, fail_die_scores, test_table, trained_fcn8s
from fcn_core.models import build_fcn
from fcn_core.inference.fastpath import fast_module
from fcn_core.inference.packed import label_packed, packed_column, predict_packed

GEOMETRIES = ("aligned", "classic")


def speed(geometry: str, *, real_sample: int, n64: int, repeats: int) -> dict:
    model = build_fcn("fcn8s", n_classes=5, preset="compact", geometry=geometry)
    out = {"geometry": geometry}
    inputs = {"synthetic 64x64": synthetic_64(n64, seed=1)}
    real = real_table(real_sample, seed=0)
    if real is not None:
        inputs["real sample"] = real
    for name, table in inputs.items():
        maps = packed_column(table)
        net = fast_module(model)  # made once, as a Scorer keeps it
        timing = time_best(lambda: label_packed(net, maps, channels_last=True, bf16=False), repeats=repeats)
        gflop = padded_gflops(model, maps.heights, maps.widths)
        out[name] = {"wafers": len(maps), **timing.summary(len(maps)), "gflop": round(gflop, 2),
                     "gflops_per_s": round(gflop / timing.best_s, 2)}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=Budget.n_train)
    parser.add_argument("--n-val", type=int, default=Budget.n_val)
    parser.add_argument("--epochs", type=int, default=Budget.epochs, help="epochs of the from-scratch FCN-8s")
    parser.add_argument("--lr", type=float, default=Budget.lr)
    parser.add_argument("--extra-aligned-epochs", type=int, default=24,
                        help="also train aligned for this many epochs (0: skip); still less wall time than classic")
    parser.add_argument("--n-test", type=int, default=600)
    parser.add_argument("--real-sample", type=int, default=400, help="real maps timed per geometry")
    parser.add_argument("--n64", type=int, default=128, help="64 x 64 maps timed per geometry")
    parser.add_argument("--skip-training", action="store_true", help="speed only")
    parser.add_argument("--cache-dir", type=Path, default=CACHE_DIR, help="where trained models are kept")
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)
    torch.manual_seed(0)
    payload: dict = {"machine": machine_info(), "threads": threads}

    rows = [speed(g, real_sample=args.real_sample, n64=args.n64, repeats=args.repeats) for g in GEOMETRIES]
    payload["speed"] = rows
    table_rows = []
    for r in rows:
        for name in ("synthetic 64x64", "real sample"):
            if name in r:
                table_rows.append({"geometry": r["geometry"], "input": name, "wafers": r[name]["wafers"],
                                   "wafers/s": r[name]["per_s"], "GFLOP/s": r[name]["gflops_per_s"],
                                   "load": max(r[name]["load_avg"])})
    ratios = {name: round(rows[0][name]["per_s"] / rows[1][name]["per_s"], 2)
              for name in ("synthetic 64x64", "real sample") if name in rows[0]}
    payload["aligned_over_classic_speed"] = ratios
    print_table(f"compact FCN-8s scoring speed by geometry ({threads} thread(s)); aligned/classic = {ratios}",
                table_rows, ["geometry", "input", "wafers", "wafers/s", "GFLOP/s", "load"])

    if not args.skip_training:
        budget = Budget(n_train=args.n_train, n_val=args.n_val, epochs=args.epochs, lr=args.lr)
        test = test_table(args.n_test)
        acc_rows = []
        for g in GEOMETRIES:
            model, info = trained_fcn8s(g, budget, threads=threads, cache_dir=args.cache_dir)
            labels = predict_packed(model, packed_column(test), bf16=False)
            scores = fail_die_scores(labels, test, n_classes=5)
            acc_rows.append({"geometry": g, "test_mean_iu": round(scores["mean_iu"], 4),
                             "test_pixel_acc": round(scores["pixel_acc"], 4), "train_wall_s": info["wall_s"],
                             "best_val_mean_iu": round(info["best_val_mean_iu"], 4),
                             "train_wafers_per_s": info["train_wafers_per_s"]})
        if args.extra_aligned_epochs:  # aligned given more epochs, still far less wall time than classic
            longer = Budget(n_train=args.n_train, n_val=args.n_val, epochs=args.extra_aligned_epochs, lr=args.lr)
            model, info = trained_fcn8s("aligned", longer, threads=threads, cache_dir=args.cache_dir)
            scores = fail_die_scores(predict_packed(model, packed_column(test), bf16=False), test, n_classes=5)
            acc_rows.append({"geometry": f"aligned, {longer.epochs} epochs",
                             "test_mean_iu": round(scores["mean_iu"], 4),
                             "test_pixel_acc": round(scores["pixel_acc"], 4), "train_wall_s": info["wall_s"],
                             "best_val_mean_iu": round(info["best_val_mean_iu"], 4),
                             "train_wafers_per_s": info["train_wafers_per_s"]})
        payload["accuracy"] = {"budget": budget.tag, "n_test": args.n_test, "rows": acc_rows,
                               "aligned_minus_classic_mean_iu": round(acc_rows[0]["test_mean_iu"]
                                                                      - acc_rows[1]["test_mean_iu"], 4)}
        print_table(f"equal-budget training ({budget.tag}), fail-die scores on {args.n_test} test wafers",
                    acc_rows, list(acc_rows[0]))
    path = save_results("geometry", payload, results_dir=args.results_dir)
    print(f"\nsaved {path}")
    return payload


if __name__ == "__main__":
    main()
