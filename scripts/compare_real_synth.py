"""Real WM-811K maps next to synthetic ones, plus size and fail-density statistics.

    .venv/bin/python scripts/compare_real_synth.py [--real PARQUET] [--out PNG] [--stats]

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
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--per-label", type=int, default=4, help="maps per side and label")
    ap.add_argument("--n-synth", type=int, default=6000, help="synthetic wafers for the histograms")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--stats", action="store_true", help="print the statistics as Markdown")
    args = ap.parse_args()
    args.real = args.real or settings().real_maps()
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


if __name__ == "__main__":
    main()
