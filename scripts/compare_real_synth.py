"""Real WM-811K (or MixedWM38) maps next to synthetic ones, plus statistics.

    .venv/bin/python scripts/compare_real_synth.py [--real PARQUET] [--out PNG] [--stats]
    .venv/bin/python scripts/compare_real_synth.py --mixed [--real PARQUET] [--out PNG] [--stats]

``--mixed`` compares against MixedWM38 (mixedwm38-val.parquet; see ``mixed_main``).

The real maps default to wm811k-val.parquet in the real-data folder ($WAFER_FCN_REAL_DATA, else
../shared/data beside the checkout; fcn_core.settings).

Writes docs/img/real_vs_synth.png: for every WM-811K failure type, real maps (left) beside
synthetic maps of the matching generator pattern (right), then histograms of grid size and aspect
(default generator mix against all real maps) and fail density per failure type. Real failure
types come on products of different sizes (Edge-Ring mostly on ~52-die grids, None mostly on
26-die ones), so the per-type synthetic sets are drawn with the real type's size mix
(size_mode_fraction, size_median) to compare like with like. ``--stats`` prints the measured
numbers as Markdown (the tables in docs/synth.md come from it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from fcn_core.config import SynthConfig  # noqa: E402
from fcn_core.settings import REAL_VALIDATION_MAPS, settings  # noqa: E402
from fcn_core.synth import PATTERN_KINDS, generate_wafers  # noqa: E402
from fcn_core.table import FAIL, die_maps, read_parquet  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "docs" / "img" / "real_vs_synth.png"
MIXED_OUT = OUT.with_name("mixed_vs_synth.png")
MIXED_MAPS = "mixedwm38-val.parquet"
DIE_COLOURS = ListedColormap(["white", "#8cc084", "#202020"])  # no die, pass, fail

ONLY = {"pattern_free_fraction": 0.0, "mixed_fraction": 0.0}
FREE = {"pattern_free_fraction": 1.0}


def _only(kind: str, **extra: float) -> dict:
    weights = {k: float(k == kind) for k in PATTERN_KINDS}
    return {**ONLY, "pattern_weights": weights, **extra}


# WM-811K failure type -> generator settings that draw the matching synthetic pattern.
RECIPES: dict[str, dict] = {
    "None": {**FREE, "random_fraction": 0.0, "near_full_fraction": 0.0},
    "Edge-Ring": _only("ring", ring_donut_fraction=0.0, ring_partial_fraction=0.15),
    "Edge-Loc": _only("local zone", local_edge_fraction=1.0),
    "Center": _only("circle"),
    "Loc": _only("local zone", local_edge_fraction=0.0),
    "Scratch": _only("scratch"),
    "Random": {**FREE, "random_fraction": 1.0, "near_full_fraction": 0.0},
    "Donut": _only("ring", ring_donut_fraction=1.0, ring_partial_fraction=0.0),
    "Near-full": {**FREE, "random_fraction": 0.0, "near_full_fraction": 1.0},
}


def size_matched(label: str, heights: np.ndarray, widths: np.ndarray, labels: np.ndarray) -> dict:
    """Generator size settings reproducing the real maps of one failure type."""
    side = np.sqrt(heights * widths)[labels == label]
    mode = SynthConfig().size_mode
    small = side <= mode + 2.5
    tail = float(np.median(side[~small])) if (~small).any() else mode + 16
    return {"size_mode_fraction": float(small.mean()), "size_median": max(tail, mode + 1)}


def fail_density(maps: list[np.ndarray]) -> np.ndarray:
    return np.array([(m == FAIL).sum() / max((m > 0).sum(), 1) for m in maps])


def show(ax: plt.Axes, m: np.ndarray, title: str) -> None:
    ax.imshow(m, cmap=DIE_COLOURS, vmin=0, vmax=2, interpolation="nearest")
    ax.set_title(title, fontsize=7)
    ax.axis("off")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", type=Path, default=None,
                    help=f"real wafer table (default: {REAL_VALIDATION_MAPS} in the real-data folder)")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"picture (default {OUT.name}, {MIXED_OUT.name} with --mixed)")
    ap.add_argument("--per-label", type=int, default=4, help="maps per side and label")
    ap.add_argument("--n-synth", type=int, default=6000, help="synthetic wafers for the histograms")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--stats", action="store_true", help="print the statistics as Markdown")
    ap.add_argument("--mixed", action="store_true",
                    help=f"compare with MixedWM38 ({MIXED_MAPS}; picture {MIXED_OUT.name}) instead of WM-811K")
    args = ap.parse_args()
    if args.mixed:
        mixed_main(args)
        return
    args.real = args.real or settings().real_maps()
    args.out = args.out or OUT
    if args.real is None or not args.real.exists():
        where = args.real or f"{REAL_VALIDATION_MAPS} in {settings().real_data_dir() or 'no real-data folder'}"
        raise SystemExit(f"real WM-811K maps not found: {where} (set WAFER_FCN_REAL_DATA to their folder, or pass --real)")

    real = read_parquet(args.real)
    real_labels = np.array(real.column("wafer_label").to_pylist())
    real_maps = die_maps(real)
    rng = np.random.default_rng(args.seed)
    k = args.per_label

    labels = list(RECIPES)
    real_h, real_w = real.column("height").to_numpy(), real.column("width").to_numpy()
    fig = plt.figure(figsize=(2 * k * 1.6 + 0.5, 1.7 * len(labels) + 4.5))
    grid = fig.add_gridspec(len(labels) + 2, 2 * k + 1, width_ratios=[1] * k + [0.12] + [1] * k,
                            height_ratios=[1] * len(labels) + [0.12, 2.3], hspace=0.3, wspace=0.04)
    synth_by_label: dict[str, list[np.ndarray]] = {}
    for row, label in enumerate(labels):
        picks = rng.choice(np.flatnonzero(real_labels == label), size=k, replace=False)
        for j, i in enumerate(picks):
            m = real_maps[i]
            show(fig.add_subplot(grid[row, j]), m, f"real {label} {m.shape[0]}x{m.shape[1]}")
        # one wafer per lot, so the pictures and the statistics span many products
        sizes = size_matched(label, real_h, real_w, real_labels)
        synth = SynthConfig(**RECIPES[label], **sizes, wafers_per_lot=1)
        maps = die_maps(generate_wafers(400, seed=args.seed + row, synth=synth))
        synth_by_label[label] = maps
        for j, m in enumerate(maps[:k]):
            show(fig.add_subplot(grid[row, k + 1 + j]), m, f"synthetic {m.shape[0]}x{m.shape[1]}")

    mix = generate_wafers(args.n_synth, seed=args.seed)
    syn_h, syn_w = mix.column("height").to_numpy(), mix.column("width").to_numpy()
    bottom = grid[len(labels) + 1, :].subgridspec(1, 3, wspace=0.25, width_ratios=[1, 1, 1.4])

    ax = fig.add_subplot(bottom[0])
    bins = np.geomspace(14, 260, 40)
    ax.hist(np.sqrt(real_h * real_w), bins, density=True, alpha=0.55, label="real (all maps)")
    ax.hist(np.sqrt(syn_h * syn_w), bins, density=True, alpha=0.55, label="synthetic (default mix)")
    ax.set_xscale("log")
    ax.set_xticks([20, 30, 50, 100, 200], ["20", "30", "50", "100", "200"])
    ax.minorticks_off()
    ax.set_xlabel("grid side sqrt(height x width)")
    ax.legend(fontsize=8)

    ax = fig.add_subplot(bottom[1])
    bins = np.linspace(-0.5, 0.5, 41)
    ax.hist(np.log(real_w / real_h), bins, density=True, alpha=0.55, label="real")
    ax.hist(np.log(syn_w / syn_h), bins, density=True, alpha=0.55, label="synthetic")
    ax.set_xlabel("aspect log(width / height)")

    ax = fig.add_subplot(bottom[2])
    pos = np.arange(len(labels))
    real_d = [fail_density([real_maps[i] for i in np.flatnonzero(real_labels == lb)]) for lb in labels]
    syn_d = [fail_density(synth_by_label[lb]) for lb in labels]
    for data, offset, colour in ((real_d, -0.2, "C0"), (syn_d, 0.2, "C1")):
        ax.boxplot(data, positions=pos + offset, widths=0.35, showfliers=False, patch_artist=True,
                   boxprops={"facecolor": colour, "alpha": 0.55}, medianprops={"color": "black"})
    ax.set_xticks(pos, labels, rotation=45, fontsize=7)
    ax.set_ylabel("fail-die density per wafer")
    ax.set_title("fail density: blue real, orange synthetic (size-matched)", fontsize=9)

    fig.suptitle("Real WM-811K wafer maps (left) and synthetic maps of the matching pattern (right)",
                 fontsize=13, y=0.905)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=72, bbox_inches="tight")
    print(f"wrote {args.out}")

    if args.stats:
        print_stats(real_h, real_w, syn_h, syn_w, labels, real_d, syn_d)


def print_stats(real_h: np.ndarray, real_w: np.ndarray, syn_h: np.ndarray, syn_w: np.ndarray,
                labels: list[str], real_d: list[np.ndarray], syn_d: list[np.ndarray]) -> None:
    q = [5, 25, 50, 75, 95]
    print("\n| | " + " | ".join(f"p{p}" for p in q) + " | share non-square | share side > 100 |")
    print("|---|" + "---|" * (len(q) + 2))
    for name, h, w in (("real", real_h, real_w), ("synthetic", syn_h, syn_w)):
        side = np.sqrt(h * w)
        print(f"| {name} sqrt(h*w) | " + " | ".join(f"{v:.0f}" for v in np.percentile(side, q))
              + f" | {(h != w).mean():.2f} | {(np.maximum(h, w) > 100).mean():.3f} |")
    print("\n| WM-811K label | real p5 / p50 / p95 | synthetic p5 / p50 / p95 |")
    print("|---|---|---|")
    for lb, r, s in zip(labels, real_d, syn_d):
        fr = " / ".join(f"{v:.3f}" for v in np.percentile(r, [5, 50, 95]))
        fs = " / ".join(f"{v:.3f}" for v in np.percentile(s, [5, 50, 95]))
        print(f"| {lb} | {fr} | {fs} |")


# -- MixedWM38 -------------------------------------------------------------------------------------------
EIGHT = np.ones((3, 3), int)
MIXED_SIDE = {"size_min": 52, "size_max": 52}  # every MixedWM38 map is 52 x 52
KIND_OF = {"Center": "circle", "Donut": "ring", "Edge-Ring": "ring", "Edge-Loc": "local zone", "Loc": "local zone",
           "Scratch": "scratch"}
MIXED_ROWS = ["Center", "Donut", "Edge-Ring", "Edge-Loc", "Loc", "Scratch", "Donut+Edge-Ring", "Edge-Loc+Loc",
              "Center+Edge-Ring", "Donut+Scratch", "Center+Edge-Ring+Loc+Scratch", "Random"]
SINGLE = ["Center", "Donut", "Edge-Ring", "Edge-Loc", "Loc", "Scratch", "none", "Random"]


def mixed_recipe(label: str, options: dict) -> dict:
    """Generator settings drawing MixedWM38 label ``label`` ('Donut+Edge-Loc+Scratch') on 52 x 52
    grids: ``options`` (the widening, or {} for today's generator) with the label's kinds forced."""
    parts = set(label.split("+"))
    if parts & {"none", "Random", "Near-full"}:
        free = {"random_fraction": float("Random" in parts), "near_full_fraction": float("Near-full" in parts)}
        return {**options, **MIXED_SIDE, **FREE, **free}
    kinds = {KIND_OF[p] for p in parts}
    n = len(kinds)
    return {**options, **MIXED_SIDE, "pattern_free_fraction": 0.0,
            "pattern_weights": {k: float(k in kinds) for k in PATTERN_KINDS},
            "mixed_fraction": float(n > 1), "mixed_three_fraction": float(n == 3), "mixed_four_fraction": float(n == 4),
            "ring_donut_fraction": float("Donut" in parts),
            "ring_partial_fraction": 0.0 if "Donut" in parts else options.get("ring_partial_fraction", 0.3),
            "double_ring_fraction": float({"Donut", "Edge-Ring"} <= parts),
            "local_edge_fraction": float("Edge-Loc" in parts),
            "double_local_fraction": float({"Edge-Loc", "Loc"} <= parts)}


def taxicab_depth(on: np.ndarray) -> np.ndarray:
    """Die layer from the rim (1 = outermost), uncapped."""
    depth, cur, k = np.zeros(on.shape, int), on.copy(), 1
    while cur.any():
        p = np.pad(cur, 1)
        inner = cur & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
        depth[cur & ~inner] = k
        cur, k = inner, k + 1
    return depth


def map_stats(m: np.ndarray) -> dict:
    """Label-free statistics of one map (real maps have no die labels).

    background: median fail rate of 16 cells (4 radial x 4 angular, 3rd die layer inwards): the
    random fails around the patterns, robust to patterns covering under half the cells.
    cluster: the largest 8-connected group of dense fail dies (>= 6 of 8 neighbours fail), as a
    share of the wafer's dies: the size of a centre, donut or Loc cluster. layers: fail rate of
    die layers 1-6 from the rim (the thickness of edge rings).
    """
    from scipy import ndimage  # lazy: only this comparison needs it

    on, fail = m > 0, m == FAIL
    depth = taxicab_depth(on)
    h, w = m.shape
    yy, xx = np.mgrid[:h, :w]
    cy, cx = yy[on].mean(), xx[on].mean()
    r = np.hypot(yy - cy, xx - cx) / np.sqrt(on.sum() / np.pi)
    quadrant = np.floor((np.arctan2(yy - cy, xx - cx) + np.pi) / (np.pi / 2))
    cells = []
    for r0, r1 in ((0, 0.4), (0.4, 0.6), (0.6, 0.75), (0.75, 0.9)):
        for q in range(4):
            sel = on & (depth >= 3) & (r >= r0) & (r < r1) & (quadrant == q)
            if sel.sum() >= 8:
                cells.append(fail[sel].mean())
    neighbours = ndimage.convolve(fail.astype(int), EIGHT, mode="constant") - fail
    groups, n = ndimage.label(fail & (neighbours >= 6), EIGHT)
    return {"background": float(np.median(cells)) if cells else np.nan,
            "cluster": float(np.bincount(groups.ravel())[1:].max() / on.sum()) if n else 0.0,
            "layers": [float(fail[depth == k].mean()) if (depth == k).any() else np.nan for k in range(1, 7)],
            "density": float(fail.sum() / max(on.sum(), 1))}


def n_patterns(label: str) -> int | None:
    """Project pattern classes a label means (Donut+Edge-Ring is one: ring); None when excluded."""
    from fcn_core.verdicts import dataset_label_patterns

    patterns = dataset_label_patterns(label)
    return None if patterns is None else len(patterns - {"none"})


def _q(values, qs=(5, 50, 95)) -> str:
    values = np.asarray(values, float)
    return " / ".join(f"{v:.3f}" for v in np.nanpercentile(values, qs)) if values.size else "-"


def mixed_main(args: argparse.Namespace) -> None:
    """MixedWM38 against today's generator and the widened one (``BROAD_OPTIONS``), like for like:
    each real label is drawn with the same kinds on 52 x 52 grids."""
    from fcn_core.synth import BROAD_OPTIONS

    args.real = args.real or settings().real_maps(MIXED_MAPS)
    args.out = args.out or MIXED_OUT
    if args.real is None or not args.real.exists():
        raise SystemExit(f"MixedWM38 maps not found: {args.real or MIXED_MAPS} "
                         "(set WAFER_FCN_REAL_DATA or pass --real)")
    real = read_parquet(args.real)
    labels = np.array(real.column("wafer_label").to_pylist())
    maps = die_maps(real)
    per = 150
    stats = {"real": {}, "today": {}, "broad": {}}
    synth_maps: dict[str, list[np.ndarray]] = {}
    for i, label in enumerate(sorted(set(labels))):
        stats["real"][label] = [map_stats(maps[j]) for j in np.flatnonzero(labels == label)]
        for name, options in (("today", {}), ("broad", BROAD_OPTIONS)):
            synth = SynthConfig(**mixed_recipe(label, options), wafers_per_lot=1)
            drawn = die_maps(generate_wafers(per, seed=args.seed + 100 * i + (name == "broad"), synth=synth))
            stats[name][label] = [map_stats(m) for m in drawn]
            if name == "broad":
                synth_maps[label] = drawn

    rng = np.random.default_rng(args.seed)
    k = 3
    fig = plt.figure(figsize=(2 * k * 1.5 + 0.5, 1.55 * len(MIXED_ROWS) + 4.2))
    grid = fig.add_gridspec(len(MIXED_ROWS) + 2, 2 * k + 1, width_ratios=[1] * k + [0.12] + [1] * k,
                            height_ratios=[1] * len(MIXED_ROWS) + [0.15, 2.4], hspace=0.35, wspace=0.04)
    for row, label in enumerate(MIXED_ROWS):
        for j, i in enumerate(rng.choice(np.flatnonzero(labels == label), size=k, replace=False)):
            show(fig.add_subplot(grid[row, j]), maps[i], f"real {label}" if j == 0 else "")
        for j, m in enumerate(synth_maps[label][:k]):
            show(fig.add_subplot(grid[row, k + 1 + j]), m, "synthetic, widened" if j == 0 else "")
    bottom = grid[len(MIXED_ROWS) + 1, :].subgridspec(1, 3, wspace=0.3)
    patterned = [lb for lb in stats["real"] if (n_patterns(lb) or 0) > 0]
    ax = fig.add_subplot(bottom[0])
    bins = np.linspace(0, 0.5, 41)
    for name, colour in (("real", "C0"), ("today", "C2"), ("broad", "C1")):
        values = [s["background"] for lb in patterned for s in stats[name][lb]]
        ax.hist(values, bins, density=True, alpha=0.5, color=colour, label=name)
    ax.set_xlabel("random fail rate around the patterns")
    ax.legend(fontsize=7)
    ax = fig.add_subplot(bottom[1])
    for name, colour in (("real", "C0"), ("today", "C2"), ("broad", "C1")):
        layers = np.nanmedian([s["layers"] for s in stats[name]["Edge-Ring"]], axis=0)
        ax.plot(range(1, 7), layers, "o-", color=colour, label=name)
    ax.set_xlabel("die layer from the rim (Edge-Ring)")
    ax.set_ylabel("fail rate")
    ax.legend(fontsize=7)
    ax = fig.add_subplot(bottom[2])
    counts = {name: pattern_counts(name, stats, labels) for name in ("real", "today default mix", "broad mix")}
    for j, ((name, c), colour) in enumerate(zip(counts.items(), ("C0", "C2", "C1"))):  # as the other panels
        ax.bar(np.arange(5) + (j - 1) * 0.27, c, width=0.27, color=colour, label=name)
    ax.set_xlabel("patterns per wafer (project classes)")
    ax.legend(fontsize=7)
    fig.suptitle("Real MixedWM38 maps (left) and the widened generator's maps of the same patterns (right)",
                 fontsize=12, y=0.905)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=72, bbox_inches="tight")
    print(f"wrote {args.out}")
    if args.stats:
        print_mixed_stats(stats, counts)


def pattern_counts(name: str, stats: dict, labels: np.ndarray) -> np.ndarray:
    """Share of wafers with 0..4 pattern classes: the real table, or a 52 x 52 mix of the generator."""
    from fcn_core.synth import BROAD_OPTIONS

    if name == "real":
        n = [n_patterns(lb) for lb in labels]
    else:
        options = BROAD_OPTIONS if name.startswith("broad") else {}
        mix = generate_wafers(4000, seed=5, synth=SynthConfig(**{**options, **MIXED_SIDE}))
        n = [n_patterns_synth(lb) for lb in mix.column("wafer_label").to_pylist()]
    n = np.array([x for x in n if x is not None])
    return np.bincount(n, minlength=5)[:5] / len(n)


def n_patterns_synth(label: str) -> int:
    return 0 if label == "none" else len(label.split("+"))


def print_mixed_stats(stats: dict, counts: dict) -> None:
    names = ("real", "today", "broad")
    print("\n| MixedWM38 label | random fail rate around patterns, real p5 / p50 / p95 | today | widened |")
    print("|---|---|---|---|")
    groups = {lb: [lb] for lb in SINGLE}
    for n in (2, 3, 4):
        groups[f"any {n} patterns"] = [lb for lb in stats["real"] if lb.count("+") == n - 1
                                       and "Near-full" not in lb]
    for group, members in groups.items():
        cells = [_q([s["background"] for lb in members for s in stats[name][lb]]) for name in names]
        print(f"| {group} | " + " | ".join(cells) + " |")
    print("\n| largest dense cluster, share of the wafer (p10 / p50 / p90) | real | today | widened |")
    print("|---|---|---|---|")
    for lb in ("Center", "Donut", "Loc", "Center+Edge-Ring", "Donut+Loc"):
        print(f"| {lb} | " + " | ".join(_q([s["cluster"] for s in stats[n][lb]], (10, 50, 90)) for n in names) + " |")
    print("\n| fail rate by die layer from the rim (median), layers 1 / 2 / 3 / 4 / 5 | real | today | widened |")
    print("|---|---|---|---|")
    for lb in ("Edge-Ring", "Edge-Loc", "Center"):
        cells = [" / ".join(f"{v:.2f}" for v in np.nanmedian([s["layers"] for s in stats[n][lb]], axis=0)[:5])
                 for n in names]
        print(f"| {lb} | " + " | ".join(cells) + " |")
    print("\n| patterns per wafer (project classes) | 0 | 1 | 2 | 3 | 4 |")
    print("|---|---|---|---|---|---|")
    for name, c in counts.items():
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in c) + " |")
    print("\n| fail density (p5 / p50 / p95) | real | today | widened |")
    print("|---|---|---|---|")
    for lb in SINGLE:
        print(f"| {lb} | " + " | ".join(_q([s["density"] for s in stats[n][lb]]) for n in names) + " |")


if __name__ == "__main__":
    main()
