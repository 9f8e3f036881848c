"""Quickly trained compact FCN-8s models for the accuracy side of the benchmarks, cached in var/bench.

Speed levers must not change answers, and the aligned-vs-classic choice needs an accuracy
difference: both need a model that has learnt something, so random weights will not do (their
near-tied logits flip under any rounding change). Models are trained with the project's own
``train_stage`` on generated wafers, with equal budgets per geometry. The FCN-8s is trained
directly from scratch: at these small budgets the staged route (32s -> 16s -> 8s, 4-2-2 epochs)
still predicted background on almost every fail die (test mean IU 0.14), while 6 direct epochs
reached a validation mean IU of 0.40.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from torch import nn

from bench.common import CACHE_DIR
from fcn_core.checkpoint import load_model
from fcn_core.config import Config, load_config
from fcn_core.data import WaferSet
from fcn_core.metrics import segmentation_scores
from fcn_core.inference.packed import PackedMaps, packed_column
from fcn_core.synth import generate_wafers
from fcn_core.table import FAIL
from fcn_core.train import train_stage


@dataclass(frozen=True)
class Budget:
    """Training budget of a from-scratch FCN-8s: training/validation wafers, epochs, learning rate."""

    n_train: int = 2000
    n_val: int = 200
    epochs: int = 8
    lr: float = 2e-3
    seed: int = 0

    @property
    def tag(self) -> str:
        return f"fcn8s-n{self.n_train}-v{self.n_val}-e{self.epochs}-lr{self.lr:g}-s{self.seed}"


def budget_config(geometry: str, budget: Budget, *, threads: int | None) -> Config:
    return load_config("default", {
        "model.geometry": geometry, "train.device": "cpu", "train.num_threads": threads, "train.seed": budget.seed,
        "train.fcn8s.epochs": budget.epochs, "train.fcn8s.lr": budget.lr,
    })


def trained_fcn8s(geometry: str, budget: Budget, *, threads: int | None = None,
                  cache_dir: Path = CACHE_DIR) -> tuple[nn.Module, dict[str, Any]]:
    """The best FCN-8s of a staged training (trained on first use, then loaded from the cache)."""
    out_dir = cache_dir / "trained" / f"{geometry}-{budget.tag}"
    info_path = out_dir / "info.json"
    if not info_path.exists():
        cfg = budget_config(geometry, budget, threads=threads)
        train = WaferSet.from_table(generate_wafers(budget.n_train, seed=budget.seed))
        val = WaferSet.from_table(generate_wafers(budget.n_val, seed=budget.seed + 1))
        t0 = time.perf_counter()
        result = train_stage(cfg, stage="fcn8s", train_set=train, val_set=val, out_dir=out_dir, resume=True,
                             progress=False)
        info = {"geometry": geometry, "budget": budget.tag, "wall_s": round(time.perf_counter() - t0, 1),
                "best_val_mean_iu": result.best_val_mean_iu, "best_epoch": result.best_epoch,
                "train_seconds": round(result.seconds, 1), "train_wafers_per_s": round(result.wafers_per_s, 1),
                "threads": threads}
        info_path.write_text(json.dumps(info, indent=1))
    info = json.loads(info_path.read_text())
    model, _ = load_model(out_dir / "fcn8s" / "best.pt")
    return model, info


def test_table(n: int, *, seed: int = 2) -> pa.Table:
    """The synthetic test split: generated wafers no model was trained or validated on."""
    return generate_wafers(n, seed=seed)


def fail_die_scores(labels: np.ndarray, table: pa.Table, *, n_classes: int) -> dict[str, float]:
    """Mean IU (and pixel accuracy) on fail dies of flat predictions against the table's label maps."""
    die, truth = packed_column(table, "die_map"), packed_column(table, "label_map")
    fail = die.data == FAIL
    hist = np.bincount(truth.data[fail].astype(np.int64) * n_classes + labels[fail],
                       minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    scores = segmentation_scores(hist)
    return {"mean_iu": scores["mean_iu"], "pixel_acc": scores["pixel_acc"], "fail_dies": int(fail.sum())}


def label_agreement(a: np.ndarray, b: np.ndarray, maps: PackedMaps) -> float:
    """Share of fail dies on which two flat predictions agree (the only dies that can differ)."""
    fail = maps.data == FAIL
    return float((a[fail] == b[fail]).mean()) if fail.any() else 1.0
