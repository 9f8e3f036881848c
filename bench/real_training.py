"""Experiment harness behind docs/real-data.md ("Which way to train on real maps: measured").

From a trained run folder (``--run var/runs/<key>``: its checkpoints and the real-map parts that
``prepare_real_task`` wrote), train ``--epochs`` of joint synthetic + real training from
``--init`` (a stage's best.pt) the way ``weak_labels`` says (``--mode mil``: the wafer-level loss of
fcn_core/weak_loss.py; ``pseudo``: cross-entropy on pseudo-masks; ``both``), then calibrate
thresholds (``--calib``: wm, mixed, joint) and print one JSON line of measured scores: synthetic
test mean IU (fail dies), WM-811K accuracy / macro-F1 / die purity / false alarms, MixedWM38
exact-set match / macro-F1. Diagnostics: ``--no-shape`` (no scratch shape rule), ``--shape-gap N``
(group scratch dies across N-die gaps), ``--tta flip2|rot4|dihedral8`` (test-time augmentation of each map before padding),
``--synth-train`` (another synthetic train file, e.g. the broad generator's). Pseudo-masks (``pseudo``,
``both``) follow the default config's ``pseudo_line_seed`` and ``pseudo_refresh_after`` unless
``--line-seed P`` (0: off; ``--seed-elong``, ``--seed-min-dies``) or ``--refresh-at E[,E...]`` (0: never) say otherwise.

    python -m bench.real_training --run var/runs/<key> --epochs 8
"""
import argparse, json, math, sys, time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from fcn_core.checkpoint import load_model
from fcn_core.config import LineSeedConfig, load_config
from fcn_core.data import WaferSet, balanced_class_weights, class_frequencies
from fcn_core.evaluate import evaluate, evaluate_real
from fcn_core.padding import IGNORE_INDEX
from fcn_core.scorer import Scorer
from fcn_core.table import read_parquet
from fcn_core.train import make_optimizer, warmup_cosine
from fcn_core.verdicts import die_purity, false_alarm_share, multilabel_scores, PATTERN_SEPARATOR, NONE
from fcn_core.weak import LineSeed, label_patterns, pseudo_mask_table
from fcn_core.weak_loss import label_sets, weak_map_loss

p = argparse.ArgumentParser()
p.add_argument("--run", required=True)
p.add_argument("--init", default="fcn1s")
p.add_argument("--epochs", type=int, default=8)
p.add_argument("--lr", type=float, default=5e-4)
p.add_argument("--real-weight", type=float, default=1.0)
p.add_argument("--presence", type=float, default=1.0)
p.add_argument("--top-k", type=int, default=5)
p.add_argument("--cap", type=int, default=800)
p.add_argument("--max-side", type=int, default=96)
p.add_argument("--real-per-step", type=int, default=32)
p.add_argument("--calib", default="joint", choices=["wm", "joint", "mixed"])
p.add_argument("--save", default=None)
p.add_argument("--init-path", default=None)
p.add_argument("--none-cap", type=int, default=None)
p.add_argument("--synth-train", default=None)
p.add_argument("--extra-test", default=None)
p.add_argument("--no-shape", action="store_true")
p.add_argument("--shape-gap", type=int, default=0)
p.add_argument("--min-elong", type=float, default=None)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--mode", default="mil", choices=["mil", "pseudo", "both"])
p.add_argument("--tta", default=None, choices=["flip2", "rot4", "dihedral8"])
p.add_argument("--random-group", action="store_true", help="Random wafers capped as their own group, not with None")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--line-seed", type=float, default=None, help="pseudo-masks: a labelled scratch's dies with at least this "
               "scratch softmax in long thin groups are taught scratch (0: off; default: the config's)")
p.add_argument("--seed-elong", type=float, default=None)
p.add_argument("--seed-min-dies", type=int, default=None)
p.add_argument("--refresh-at", type=lambda v: [int(x) for x in v.split(",") if int(x)], default=None,
               help="redraw the pseudo-masks from the model being trained after these epochs (0: never; default: the config's)")
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(a.seed)
run = Path(a.run)
cfg = load_config("default")
t0 = time.time()
if a.init_path:
    from fcn_core.models import fcn_from_arch
    st = torch.load(a.init_path, weights_only=True)
    model = fcn_from_arch(st["arch"]); model.load_state_dict(st["model"])
else:
    model, _ = load_model(str(run / "checkpoints" / a.init / "best.pt"))
model = model.train().to(memory_format=torch.channels_last)
train = WaferSet.from_table(read_parquet(a.synth_train or str(run / "data/train.parquet")))
test = WaferSet.from_table(read_parquet(str(run / "data/test.parquet")))

real = read_parquet(str(run / "data/real_train.parquet"))
pats = label_patterns(real, cfg.class_names)
side = np.maximum(np.array(real["height"]), np.array(real["width"]))
groups = {}
for i, s in enumerate(pats):
    if s is None or side[i] > a.max_side:
        continue
    key = (-1,) if a.random_group and real["wafer_label"][i].as_py() == "Random" else tuple(sorted(s))
    groups.setdefault(key, []).append(i)
rng = np.random.default_rng(0)
keep = []
for key, rows in sorted(groups.items()):
    cap = a.none_cap if (a.none_cap and key == ()) else a.cap
    if len(rows) > cap:
        rows = sorted(rng.choice(rows, cap, replace=False).tolist())
    keep += rows
keep.sort()
print("real kept", len(keep), {"+".join(map(str, k)) or "none": min(a.cap, len(v)) for k, v in sorted(groups.items())})
sample = real.take(pa.array(keep))
ft = cfg.train.finetune
seed_cfg = ft.pseudo_line_seed
if a.line_seed is not None or a.seed_elong is not None or a.seed_min_dies is not None:
    base = seed_cfg or LineSeedConfig()
    seed_cfg = None if a.line_seed == 0 else base.model_copy(update={k: v for k, v in (
        ("min_prob", a.line_seed), ("min_elongation", a.seed_elong), ("min_dies", a.seed_min_dies)) if v is not None})
line_seed = LineSeed.from_config(seed_cfg, cfg.class_names)
refresh_at = a.refresh_at if a.refresh_at is not None else [e for e in [ft.refresh_epoch_of(a.epochs)] if e]


def draw_masks():
    pm, rep = pseudo_mask_table(sample, model, class_names=cfg.class_names, min_prob=ft.pseudo_min_prob,
                                line_seed=line_seed)
    model.train()
    assert pm["wafer_id"].to_pylist() == sample["wafer_id"].to_pylist()
    return WaferSet.from_table(pm), rep.dies


if a.mode == "mil":
    real_set = WaferSet.from_table(sample.drop(["label_map"]).append_column("label_map", pa.nulls(len(keep), pa.binary())))
else:
    real_set, dies = draw_masks()
    print("pseudo", dies, "line seed", line_seed, "redrawn after epochs", refresh_at)
allowed_all, present_all = label_sets([pats[i] for i in keep], cfg.n_classes)

weights = torch.from_numpy(balanced_class_weights(class_frequencies(train, cfg.n_classes)))
ce = nn.CrossEntropyLoss(weight=weights, ignore_index=IGNORE_INDEX)
opt = make_optimizer(cfg, model, a.lr)
steps_per_epoch = math.ceil(len(train) / 32) + 5
sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps_per_epoch * a.epochs, warmup=50))


def real_batches():
    ep = 0
    while True:
        for idx, b in real_set.batches(batch_size=a.real_per_step, shuffle=True, seed=100 + ep + 1000 * a.seed, augment=True,
                                       with_targets=a.mode != "mil"):
            yield idx, b
        ep += 1


rb = real_batches()
for epoch in range(a.epochs):
    te = time.time()
    ls, lr_, n = 0.0, 0.0, 0
    for idx, b in train.batches(batch_size=32, shuffle=True, seed=epoch + 1000 * a.seed, augment=True):
        if not bool((b.target != IGNORE_INDEX).any()):
            continue
        x = b.x.contiguous(memory_format=torch.channels_last)
        loss_s = ce(model(x), b.target)
        loss = loss_s
        if a.real_weight > 0:
            ridx, r = next(rb)
            rl = model(r.x.contiguous(memory_format=torch.channels_last))
            loss_r = 0.0
            if a.mode in ("mil", "both"):
                loss_r = weak_map_loss(rl, r.die, allowed_all[ridx], present_all[ridx], top_k=a.top_k,
                                       presence_weight=a.presence)
            if a.mode in ("pseudo", "both") and bool((r.target != IGNORE_INDEX).any()):
                loss_r = loss_r + ce(rl, r.target)
            loss = loss + a.real_weight * loss_r
            lr_ += float(loss_r.detach()) if torch.is_tensor(loss_r) else 0.0
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); sched.step()
        ls += float(loss_s); n += 1
    if a.mode != "mil" and epoch + 1 in refresh_at:
        tr = time.time()
        real_set, dies = draw_masks()
        rb = real_batches()  # the next real batch comes from the new masks
        print("pseudo-masks redrawn", dies, f"{time.time() - tr:.0f}s")
    val = evaluate(model, test, n_classes=cfg.n_classes)
    print(f"epoch {epoch+1} synth {ls/n:.4f} real {lr_/n:.4f} test fail mIU {val.fail_only['mean_iu']:.4f} "
          f"{time.time()-te:.0f}s", flush=True)

model.eval()
val = evaluate(model, test, n_classes=cfg.n_classes)
print("test fail mean IU", round(val.fail_only["mean_iu"], 4), "per class", np.round(val.fail_only["iou"], 3))
extra = None
if a.extra_test:
    ev = evaluate(model, WaferSet.from_table(read_parquet(a.extra_test)), n_classes=cfg.n_classes)
    extra = round(ev.fail_only["mean_iu"], 4)
    print("extra test fail mean IU", extra, np.round(ev.fail_only["iou"], 3))
TTA_GROUPS = {"flip2": [(0, False), (0, True)], "rot4": [(k, False) for k in range(4)],
              "dihedral8": [(k, f) for k in range(4) for f in (False, True)]}


def tta_labels(net, die_maps):
    """Label maps from softmax averaged over transforms of each map (before padding), transformed back."""
    from fcn_core.weak import softmax_maps
    acc = None
    for k, f in TTA_GROUPS[a.tta]:
        fwd = [np.ascontiguousarray(np.flip(np.rot90(d, k), -1) if f else np.rot90(d, k)) for d in die_maps]
        probs = softmax_maps(net, fwd)
        back = [np.rot90(np.flip(p, -1) if f else p, -k, axes=(-2, -1)) for p in probs]
        acc = back if acc is None else [x + y for x, y in zip(acc, back)]
    return [x.argmax(0).astype(np.uint8) for x in acc]


if a.tta:
    from fcn_core.metrics import segmentation_scores
    from fcn_core.table import FAIL
    hist = np.zeros((cfg.n_classes, cfg.n_classes))
    for d, lab, pred in zip(test.die, test.label, tta_labels(model, test.die)):
        fail = d == FAIL
        np.add.at(hist, (lab[fail].astype(int), pred[fail].astype(int)), 1)
    tta_scores = segmentation_scores(hist)
    print("TTA", a.tta, "test fail mean IU", round(tta_scores["mean_iu"], 4), np.round(tta_scores["iou"], 3))
    val.fail_only["mean_iu"] = tta_scores["mean_iu"]
if a.shape_gap:
    import fcn_core.shapes as SH
    from scipy import ndimage
    _orig = SH.group_elongation
    def gapped(mask):
        mask = np.asarray(mask, dtype=bool)
        grown = ndimage.binary_dilation(mask, structure=np.ones((3, 3), bool), iterations=a.shape_gap)
        g, n = ndimage.label(grown, structure=SH.EIGHT_NEIGHBOURS)
        g = np.where(mask, g, 0)
        # reuse the original maths per group by relabelling: compute on mask with these ids
        ys, xs = np.nonzero(g); ids = g[ys, xs]
        if n == 0: return g, np.zeros(0, np.int64), np.zeros(0)
        count = np.bincount(ids, minlength=n + 1)[1:]
        cnt = np.maximum(count, 1)
        mean = lambda v: np.bincount(ids, weights=v.astype(np.float64), minlength=n + 1)[1:] / cnt
        my, mx = mean(ys), mean(xs)
        vyy = mean(ys * ys) - my * my + SH.DIE_VARIANCE; vxx = mean(xs * xs) - mx * mx + SH.DIE_VARIANCE
        vxy = mean(ys * xs) - my * mx
        ht = (vyy + vxx) / 2; sp = np.sqrt(np.maximum(ht ** 2 - (vyy * vxx - vxy ** 2), 0.0))
        l1, l2 = ht + sp, np.maximum(ht - sp, 1e-12)
        el = np.sqrt(l1 / l2); el[count == 0] = 99
        return g, count.astype(np.int64), el
    SH.group_elongation = gapped
if a.min_elong is not None:
    cfg.verdict.min_elongation_by_class["scratch"] = a.min_elong
verdict = cfg.verdict.model_copy(update={"min_elongation_by_class": {}}) if a.no_shape else cfg.verdict
scorer = Scorer(model, verdict, cfg)
if a.tta:  # every real-map path (calibration and scoring) predicts through the same per-map TTA
    Scorer.predict_maps = lambda self, die_maps, **speed: tta_labels(self.model, die_maps)
wcal = read_parquet(str(run / "data/wm811k-val_calibration.parquet"))
mcal = read_parquet(str(run / "data/mixedwm38-val_calibration.parquet"))
if a.calib == "wm":
    scorer, f1 = scorer.calibrated(WaferSet.from_table(wcal).die, wcal["wafer_label"].to_pylist(), source="wm")
elif a.calib == "mixed":
    scorer, f1 = scorer.calibrated(WaferSet.from_table(mcal).die, mcal["wafer_label"].to_pylist(), source="mx",
                                   multilabel=True)
else:
    scorer, f1 = scorer.calibrated_joint((WaferSet.from_table(wcal).die, wcal["wafer_label"].to_pylist()),
                                         (WaferSet.from_table(mcal).die, mcal["wafer_label"].to_pylist()),
                                         source="both")
print("calibrated", scorer.verdict.describe(), round(f1, 3))
ws = read_parquet(str(run / "data/wm811k-val_scoring.parquet"))
r = evaluate_real(scorer, ws)
die = WaferSet.from_table(ws).die
dies = scorer.fail_die_counts(r.pred_maps, die, shaped=True)
pur = die_purity(dies, r.dataset_labels, class_names=scorer.class_names)
fa = false_alarm_share(dies, r.dataset_labels, class_names=scorer.class_names)
m = r.report.metrics(prefix="")
ms = read_parquet(str(run / "data/mixedwm38-val_scoring.parquet"))
mdie = WaferSet.from_table(ms).die
preds = scorer.shaped_maps(scorer.predict_maps(mdie), mdie, inplace=True)
vs = scorer.verdicts(preds, mdie, shaped=True)
mls = multilabel_scores(ms["wafer_label"].to_pylist(), vs.patterns, pattern_names=scorer.class_names[1:])
out = {"synth_miou": round(val.fail_only["mean_iu"], 4), "extra_miou": extra, "wm_acc": round(m["accuracy"], 3),
       "wm_f1": round(m["macro_f1"], 3), "purity": round(pur["purity"], 3), "false_alarm": round(fa["share"], 4),
       "mixed_exact": round(mls["exact_match"], 3), "mixed_f1": round(mls["macro_f1"], 3),
       "mixed_per": {k: round(v["f1"], 3) for k, v in mls["per_pattern"].items()},
       "purity_by": {k: round(v["purity"], 3) for k, v in pur["by_label"].items()},
       "args": vars(a), "seconds": round(time.time() - t0)}
print(json.dumps(out))
if a.save:
    torch.save({"arch": dict(model.arch), "model": model.state_dict()}, a.save)
