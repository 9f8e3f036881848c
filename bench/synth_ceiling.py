"""The best fail-die scores any model could reach on the synthetic data (issue #13's 0.80 mean IU target).

The generator labels a fail die by the pattern that *fired* it, not by where it lies: a die inside a
ring's band that the ring's draw missed but the background's draw hit is labelled background, and a
die a ring fired under a later scratch that also fired is labelled scratch. No model can undo that
label noise. This script measures it with an oracle that knows every Bernoulli draw's probability
map, but not the draws themselves:

* It runs the unchanged generator (``fcn_core.synth.generate_wafers``) with ``_wafer``, ``_pattern``,
  ``_fire`` and ``_scratch`` wrapped to record, per wafer, the background rate b and, for each
  pattern call in draw order, its per-die fire probability p (a scratch does not call ``_fire``: it
  thins the dies its lines cross with one probability q, read back by replaying its random stream).
* Every record is checked: each pattern call's mask is the union of its recorded draws, the
  background draw plus the pattern masks give the generator's fail mask, "the last pattern drawn
  labels a die" gives its labels, and both match the returned table's die and label maps. A
  generator change that breaks these assumptions stops the script with a one-line error.
* The oracle's joint probability of (label, fail) for a die: a pattern kind k (P_k = 1 - prod(1 - p)
  over its calls) P_k * prod over kinds drawn after k of (1 - P_j); background b * prod_k (1 - P_k).
  Given the maps, dies are independent, so this is the Bayes posterior given everything the
  generator knew except its uniform draws: an upper bound for any model that sees only the die map.
* Argmax of the posterior maximises accuracy, not mean IU, so class weights (background fixed at 1)
  are tuned by coordinate search for mean IU on one seed and reported on another.

Scores are the FCN paper's four (``fcn_core.metrics.segmentation_scores``) over fail dies only, as
``fcn_core.evaluate`` reports ``fail_only``; the demo's test split is the hash split by lot of the
demo's own wafers (seed and count of ``data.synth``).

    python -m bench.synth_ceiling [--n 4000] [--eval-seed 0] [--tune-seed 1] [--generators default,broad]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import pyarrow.compute as pc

from bench.common import RESULTS_DIR, finish, machine_info, print_table
from fcn_core import synth
from fcn_core.config import Config, SynthConfig, load_config
from fcn_core.ingest import assign_splits
from fcn_core.metrics import segmentation_scores
from fcn_core.table import FAIL, die_maps, label_maps

NAME = "synth-ceiling"
WEIGHT_GRID = np.exp(np.linspace(-3.0, 3.0, 61))  # class-weight candidates, background fixed at 1
SCORE_COLUMNS = ("pixel_acc", "mean_acc", "mean_iu", "fw_iu")


class ReconstructionError(RuntimeError):
    """The recorded draws do not reproduce the generator's wafer: the oracle would be wrong."""


# -- recording the generator's draws ----------------------------------------------------------------
@dataclass
class _Draw:
    """One Bernoulli draw over a wafer's dies: the probability each die had, and which fired."""

    prob: np.ndarray
    fired: np.ndarray


@dataclass
class _PatternCall:
    kind: str
    draws: list[_Draw] = field(default_factory=list)
    hit: np.ndarray | None = None  # what _pattern returned


@dataclass
class _WaferRecord:
    background: list[_Draw] = field(default_factory=list)
    patterns: list[_PatternCall] = field(default_factory=list)


@dataclass
class OracleData:
    """Per fail die of the generated wafers: its wafer's row, true label and the oracle's joint
    probabilities of (class, fail); plus the calibration totals of every recorded draw."""

    row: np.ndarray
    label: np.ndarray
    joint: np.ndarray  # (n_fail_dies, n_classes)
    wafers: int
    expected_fires: float  # sum of every recorded draw's probabilities
    observed_fires: int  # dies those draws fired
    variance: float  # sum of p(1-p): the spread of observed_fires


class _SpyRng:
    """Forwards every call to a numpy Generator and logs (method, args, result); the call numbered
    ``zero_call`` returns zeros of its result's shape instead (the stream still advances)."""

    def __init__(self, rng: np.random.Generator, zero_call: int | None = None) -> None:
        self._rng, self._zero_call, self.calls = rng, zero_call, []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._rng, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            out = method(*args, **kwargs)
            if len(self.calls) == self._zero_call:
                out = np.zeros_like(out)
            self.calls.append((name, args, out))
            return out

        return call


class _Recorder:
    """Wraps the generator's private functions for the duration of ``recording()``."""

    def __init__(self, n_classes: int) -> None:
        self.n_classes = n_classes
        self.wafer: _WaferRecord | None = None
        self.pattern: _PatternCall | None = None
        self.rows: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self.calibration = np.zeros(3)  # expected, observed, variance
        self.orig = {name: getattr(synth, name) for name in ("_wafer", "_pattern", "_fire", "_scratch")}

    # wrappers -----------------------------------------------------------------------------------
    def fire(self, rng: np.random.Generator, prob: np.ndarray) -> np.ndarray:
        fired = self.orig["_fire"](rng, prob)
        if self.wafer is None:
            raise ReconstructionError("_fire called outside _wafer: the generator's structure changed")
        # copies: _wafer ORs the patterns into the background's mask in place (fail |= hit)
        draw = _Draw(np.array(prob, float), fired.copy())
        (self.pattern.draws if self.pattern else self.wafer.background).append(draw)
        return fired

    def scratch(self, rng: np.random.Generator, g: Any, **kwargs: Any) -> np.ndarray:
        """The scratch's dies: those its lines cross (``candidates``), each kept if a uniform < q.
        The candidates come from a replay of the same stream whose thinning draw is all zeros."""
        state = rng.bit_generator.state
        spy = _SpyRng(rng)
        hit = self.orig["_scratch"](spy, g, **kwargs)
        (thin_name, _, thin), (q_name, q_args, q) = spy.calls[-2:]
        if thin_name != "random" or q_name != "uniform" or q_args != (0.8, 1.0):
            raise ReconstructionError(f"_scratch's last draws are {thin_name}, {q_name}{q_args}, "
                                      "not random(n) < uniform(0.8, 1.0)")
        clone = np.random.Generator(type(rng.bit_generator)())
        clone.bit_generator.state = state
        replay = _SpyRng(clone, zero_call=len(spy.calls) - 2)
        candidates = self.orig["_scratch"](replay, g, **kwargs)
        dies = np.flatnonzero(candidates)
        if dies.size != np.size(thin) or not np.array_equal(dies[np.asarray(thin) < q], np.flatnonzero(hit)):
            raise ReconstructionError("_scratch's mask is not its line dies thinned by its last draw")
        self.pattern.draws.append(_Draw(np.where(candidates, float(q), 0.0), hit.copy()))
        return hit

    def pattern_call(self, rng: np.random.Generator, kind: str, *args: Any, **kwargs: Any) -> tuple[np.ndarray, str]:
        if self.pattern is not None:
            raise ReconstructionError("_pattern called inside _pattern: the generator's structure changed")
        self.pattern = _PatternCall(kind)
        try:
            hit, variant = self.orig["_pattern"](rng, kind, *args, **kwargs)
        finally:
            call, self.pattern = self.pattern, None
        union = np.logical_or.reduce([d.fired for d in call.draws]) if call.draws else None
        if union is None or not np.array_equal(union, hit):
            raise ReconstructionError(f"a {kind} pattern's mask is not the union of its {len(call.draws)} draw(s)")
        call.hit = hit.copy()
        self.wafer.patterns.append(call)
        return hit, variant

    def wafer_call(self, rng: np.random.Generator, g: Any, s: SynthConfig, weights: np.ndarray,
                   ids: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
        self.wafer = _WaferRecord()
        try:
            fail, label = self.orig["_wafer"](rng, g, s, weights, ids)
        finally:
            record, self.wafer = self.wafer, None
        joint = self._check_and_score(record, fail, label, ids)
        self.rows.append((g.sites, np.asarray(fail), np.asarray(label), joint[fail].astype(np.float32),
                          np.array([g.height, g.width])))
        for draw in [*record.background, *(d for c in record.patterns for d in c.draws)]:
            p = np.clip(draw.prob, 0.0, 1.0)
            self.calibration += (p.sum(), draw.fired.sum(), (p * (1 - p)).sum())
        return fail, label

    # the oracle ---------------------------------------------------------------------------------
    def _check_and_score(self, record: _WaferRecord, fail: np.ndarray, label: np.ndarray,
                         ids: dict[str, int]) -> np.ndarray:
        if len(record.background) != 1:
            raise ReconstructionError(f"{len(record.background)} background draws on a wafer, expected 1")
        order = [synth.DRAW_ORDER.index(c.kind) for c in record.patterns]
        if order != sorted(order):
            raise ReconstructionError(f"patterns drawn as {[c.kind for c in record.patterns]}, not in DRAW_ORDER")
        bg = record.background[0]
        rebuilt_fail, rebuilt_label = bg.fired.copy(), np.zeros_like(label)
        for call in record.patterns:  # the generator's rule: every hit fails, the last hit labels
            rebuilt_fail |= call.hit
            rebuilt_label[call.hit] = ids[call.kind]
        if not np.array_equal(rebuilt_fail, fail):
            raise ReconstructionError("recorded draws do not rebuild the generator's fail mask")
        if not np.array_equal(rebuilt_label, label):
            raise ReconstructionError("recorded draws and the last-pattern-wins rule do not rebuild the labels")
        miss: dict[str, np.ndarray] = {}  # per kind: probability that none of its calls fires a die
        for call in record.patterns:
            for draw in call.draws:
                miss[call.kind] = miss.get(call.kind, 1.0) * (1 - np.clip(draw.prob, 0.0, 1.0))
        joint = np.zeros((fail.size, self.n_classes))
        later_miss = np.ones(fail.size)  # kinds drawn after the current one all missed
        for kind in reversed([k for k in synth.DRAW_ORDER if k in miss]):
            joint[:, ids[kind]] = (1 - miss[kind]) * later_miss
            later_miss = later_miss * miss[kind]
        joint[:, 0] = np.clip(bg.prob, 0.0, 1.0) * later_miss
        return joint

    def data(self, table: Any) -> OracleData:
        """Check the recorded wafers against the returned table's maps and gather the fail dies."""
        if len(self.rows) != table.num_rows:
            raise ReconstructionError(f"recorded {len(self.rows)} wafers, the table holds {table.num_rows}")
        rows, labels, joints = [], [], []
        for i, ((sites, fail, label, joint, shape), die, lab) in enumerate(
                zip(self.rows, die_maps(table), label_maps(table))):
            if die.shape != tuple(shape) or lab.shape != die.shape:
                raise ReconstructionError(f"wafer row {i}: recorded grid {tuple(shape)}, table {die.shape}")
            die, lab = die.ravel(), lab.ravel()
            if not np.array_equal(np.flatnonzero(die == FAIL), sites[fail]):
                raise ReconstructionError(f"wafer row {i}: recorded fail dies differ from the table's die map")
            if not np.array_equal(np.flatnonzero(lab), sites[label > 0]) or not np.array_equal(
                    lab[sites[fail]], label[fail]):
                raise ReconstructionError(f"wafer row {i}: recorded labels differ from the table's label map")
            rows.append(np.full(int(fail.sum()), i, np.int32))
            labels.append(label[fail])
            joints.append(joint)
        expected, observed, variance = self.calibration
        z = (observed - expected) / np.sqrt(max(variance, 1e-12))
        if abs(z) > 6:  # the recorded probabilities do not describe the recorded fires
            raise ReconstructionError(f"recorded draws fired {observed:.0f} dies, their probabilities expect "
                                      f"{expected:.0f} (z = {z:.1f})")
        return OracleData(row=np.concatenate(rows), label=np.concatenate(labels).astype(np.int64),
                          joint=np.concatenate(joints), wafers=len(self.rows), expected_fires=float(expected),
                          observed_fires=int(observed), variance=float(variance))


@contextmanager
def recording(n_classes: int) -> Iterator[_Recorder]:
    """Wrap fcn_core.synth's private functions (module globals, looked up at call time) meanwhile."""
    rec = _Recorder(n_classes)
    wrappers = {"_wafer": rec.wafer_call, "_pattern": rec.pattern_call, "_fire": rec.fire, "_scratch": rec.scratch}
    try:
        for name, fn in wrappers.items():
            setattr(synth, name, fn)
        yield rec
    finally:
        for name, fn in rec.orig.items():
            setattr(synth, name, fn)


def oracle_data(n: int, *, seed: int, synth_cfg: SynthConfig, cfg: Config) -> tuple[OracleData, Any]:
    """Generate ``n`` wafers as the demo does, recording and checking every draw; also return the
    table and check it equals an unrecorded generation (the wrappers change no random number)."""
    with recording(len(cfg.classes)) as rec:
        table = synth.generate_wafers(n, seed=seed, synth=synth_cfg, classes=cfg.classes)
    plain = synth.generate_wafers(n, seed=seed, synth=synth_cfg, classes=cfg.classes)
    if not table.equals(plain):
        raise ReconstructionError("recording changed the generated wafers")
    return rec.data(table), table


# -- scoring ----------------------------------------------------------------------------------------
def confusion(truth: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    return np.bincount(truth * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def oracle_scores(data: OracleData, weights: np.ndarray, keep: np.ndarray | None = None) -> dict[str, Any]:
    """Fail-die scores of the oracle's weighted-argmax guess (``keep``: a mask over fail dies)."""
    joint, label = (data.joint, data.label) if keep is None else (data.joint[keep], data.label[keep])
    hist = confusion(label, np.argmax(joint * weights, axis=1), joint.shape[1])
    return {**segmentation_scores(hist), "hist": hist, "fail_dies": int(hist.sum())}


def tune_weights(data: OracleData, *, sweeps: int = 3) -> np.ndarray:
    """Class weights (background 1) maximising fail-die mean IU: coordinate search over WEIGHT_GRID."""
    weights = np.ones(data.joint.shape[1])
    best = oracle_scores(data, weights)["mean_iu"]
    for _ in range(sweeps):
        improved = False
        for c in range(1, weights.size):
            for w in WEIGHT_GRID:
                trial = weights.copy()
                trial[c] = w
                score = oracle_scores(data, trial)["mean_iu"]
                if score > best + 1e-9:
                    best, weights, improved = score, trial, True
        if not improved:
            break
    return weights


def _row(what: str, scores: dict[str, Any], class_names: list[str]) -> dict[str, Any]:
    row = {"measured on": what, "fail dies": scores["fail_dies"],
           **{k: round(scores[k], 4) for k in SCORE_COLUMNS}}
    row.update({f"IoU {n}": round(v, 4) for n, v in zip(class_names, scores["iou"])})
    return row


def measure(generator: str, synth_cfg: SynthConfig, cfg: Config, *, n: int, eval_seed: int,
            tune_seed: int) -> dict[str, Any]:
    names = [c.name for c in cfg.classes]
    evaluated, table = oracle_data(n, seed=eval_seed, synth_cfg=synth_cfg, cfg=cfg)
    tuning, _ = oracle_data(n, seed=tune_seed, synth_cfg=synth_cfg, cfg=cfg)
    weights = tune_weights(tuning)
    test_rows = np.flatnonzero(np.asarray(pc.equal(assign_splits(table, cfg.data.split), "test")))
    test = np.isin(evaluated.row, test_rows)
    argmax_ones = np.ones(len(names))
    runs = [(f"seed {eval_seed}, all {n} wafers", "argmax", evaluated, argmax_ones, None),
            (f"seed {eval_seed}, all {n} wafers", "weighted", evaluated, weights, None),
            (f"seed {eval_seed}, test split ({test_rows.size} wafers)", "argmax", evaluated, argmax_ones, test),
            (f"seed {eval_seed}, test split ({test_rows.size} wafers)", "weighted", evaluated, weights, test),
            (f"seed {tune_seed} (tuning), all {n} wafers", "argmax", tuning, argmax_ones, None),
            (f"seed {tune_seed} (tuning), all {n} wafers", "weighted", tuning, weights, None)]
    rows, confusions = [], {}
    for what, rule, data, w, keep in runs:
        if keep is not None and not keep.any():
            continue  # a tiny run can have no test lot
        scores = oracle_scores(data, w, keep)
        rows.append({"generator": generator, "oracle": rule, **_row(what, scores, names)})
        hist = scores["hist"].astype(float)
        confusions[f"{what}, {rule}"] = (hist / np.maximum(hist.sum(axis=1, keepdims=True), 1)).round(4).tolist()
    return {"generator": generator, "rows": rows, "row_normalised_confusion": confusions,
            "weights": {nm: round(float(w), 4) for nm, w in zip(names, weights)},
            "checks": {"wafers_verified": evaluated.wafers + tuning.wafers,
                       "fail_dies_verified": int(evaluated.label.size + tuning.label.size),
                       "draws_expected_fires": round(evaluated.expected_fires, 1),
                       "draws_observed_fires": evaluated.observed_fires,
                       "calibration_z": round(float((evaluated.observed_fires - evaluated.expected_fires)
                                                    / np.sqrt(max(evaluated.variance, 1e-12))), 2)}}


# -- output -----------------------------------------------------------------------------------------
def _markdown(payload: dict[str, Any], names: list[str]) -> str:
    m = payload["machine"]
    cols = ["generator", "measured on", "oracle", "fail dies", *SCORE_COLUMNS, *(f"IoU {n}" for n in names)]
    heads = ["generator", "measured on", "oracle", "fail dies", "pixel acc.", "mean acc.", "mean IU", "f.w. IU",
             *(f"IoU {n}" for n in names)]
    out = [
        "# Synthetic label-noise ceiling (fail dies)", "",
        f"Written by `python -m bench.synth_ceiling{''.join(' ' + a for a in payload['argv'])}`; method in the "
        "script's docstring. The oracle knows each wafer's exact per-die fire probabilities (the background "
        "rate and every pattern draw, recorded from the unchanged generator and checked to rebuild its fail "
        "and label maps exactly) and labels each fail die by its posterior: an upper bound for any model "
        "that sees only the die map. *argmax*: the most probable label (maximises accuracy); *weighted*: the "
        f"posterior times class weights tuned for mean IU on seed {payload['tune_seed']}, so on seed "
        f"{payload['eval_seed']} they are out of sample.", "",
        f"Machine: {m['cpu_model']}, {m['cpu_cores']} cores, {platform.platform()}, Python {m['python']}; "
        f"{payload['runtime_s']} s wall, load {m['load_avg_1m_at_start']} at start; {m['date']}.", "",
        "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads),
    ]
    for result in payload["results"]:
        for r in result["rows"]:
            out.append("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    out.append("")
    for result in payload["results"]:
        out.append(f"**{result['generator']}**: weights {result['weights']}; checks {result['checks']}.")
        for key in [k for k in result["row_normalised_confusion"] if k.startswith(f"seed {payload['eval_seed']}, all")]:
            out += ["", f"Row-normalised confusion, {result['generator']} generator, {key} (rows: truth, "
                    "columns: oracle):", ""]
            out += ["| truth \\ oracle | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
            for nm, row in zip(names, result["row_normalised_confusion"][key]):
                out.append(f"| {nm} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where synth-ceiling.json/.md go")
    parser.add_argument("--config", default="default", help="config whose data.synth and classes are used")
    parser.add_argument("--n", type=int, default=None, help="wafers per seed (default: data.synth.n_wafers)")
    parser.add_argument("--eval-seed", type=int, default=None, help="reported seed (default: data.synth.seed)")
    parser.add_argument("--tune-seed", type=int, default=1, help="seed the class weights are tuned on")
    parser.add_argument("--generators", default="default,broad", help="default (the config's), broad (+BROAD_OPTIONS)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    n = args.n or cfg.data.synth.n_wafers
    eval_seed = cfg.data.synth.seed if args.eval_seed is None else args.eval_seed
    if eval_seed == args.tune_seed:
        parser.error("--eval-seed and --tune-seed must differ: weights are reported on unseen wafers")
    generators = {"default": cfg.data.synth, "broad": cfg.data.synth.model_copy(update=synth.BROAD_OPTIONS)}
    chosen = [g for g in args.generators.split(",") if g]
    unknown = sorted(set(chosen) - set(generators))
    if unknown:
        parser.error(f"unknown generator(s) {unknown}; choose from {sorted(generators)}")
    names = [c.name for c in cfg.classes]
    t0 = time.perf_counter()
    payload: dict[str, Any] = {"machine": machine_info(), "argv": list(argv if argv is not None else sys.argv[1:]),
                               "n_wafers_per_seed": n, "eval_seed": eval_seed, "tune_seed": args.tune_seed,
                               "results": []}
    for gen in chosen:
        result = measure(gen, generators[gen], cfg, n=n, eval_seed=eval_seed, tune_seed=args.tune_seed)
        payload["results"].append(result)
        print_table(f"oracle fail-die scores, {gen} generator (weights {result['weights']})", result["rows"],
                    ["measured on", "oracle", "fail dies", *SCORE_COLUMNS, *(f"IoU {nm}" for nm in names)])
        print(f"checks: {result['checks']}")
        for key, matrix in result["row_normalised_confusion"].items():
            print(f"row-normalised confusion, {key} (rows truth, columns oracle; {', '.join(names)}):")
            print("\n".join("  " + " ".join(f"{v:6.3f}" for v in row) for row in matrix))
    payload["runtime_s"] = round(time.perf_counter() - t0, 1)
    print(f"\nmachine: {platform.platform()}, {os.cpu_count()} cores, {payload['machine']['cpu_model']}; "
          f"runtime {payload['runtime_s']} s")
    finish(NAME, payload, results_dir=args.results_dir)
    md = Path(args.results_dir) / f"{NAME}.md"
    md.write_text(_markdown(payload, names) + "\n")
    print(f"saved {md}")
    return payload


if __name__ == "__main__":
    main()
