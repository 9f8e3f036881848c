"""How well can an output of stride B label dies at best? (docs/models.md, "Finer stages").

For each B, every B x B block of dies gets one label, the most common true label among its fail
dies: the best any block-constant labelling can do, knowing the truth. The printed fail-die mean
IU is therefore an upper bound for a model whose scores live on a stride-B grid.

    .venv/bin/python scripts/block_ceiling.py --n 1500 --seed 5   # the table in docs/models.md
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from fcn_core.config import DEFAULT_CLASSES, SynthConfig
from fcn_core.metrics import segmentation_scores
from fcn_core.synth import generate_wafers
from fcn_core.table import FAIL, die_maps, label_maps


def block_confusion(die: np.ndarray, label: np.ndarray, block: int, n_classes: int) -> np.ndarray:
    """Confusion of fail-die labels against their block's majority label."""
    hist = np.zeros((n_classes, n_classes), np.int64)
    fail = die == FAIL
    for r in range(0, die.shape[0], block):
        for c in range(0, die.shape[1], block):
            truth = label[r:r + block, c:c + block][fail[r:r + block, c:c + block]]
            if truth.size:
                majority = np.bincount(truth, minlength=n_classes).argmax()
                hist[:, majority] += np.bincount(truth, minlength=n_classes)
    return hist


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1500, help="generator wafers (default config's generator)")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--blocks", type=int, nargs="+", default=[8, 4, 2, 1])
    args = parser.parse_args(argv)
    names = [c.name for c in DEFAULT_CLASSES]
    table = generate_wafers(args.n, seed=args.seed, synth=SynthConfig())
    rows = []
    for block in args.blocks:
        hist = sum(block_confusion(d, lab, block, len(names)) for d, lab in zip(die_maps(table), label_maps(table)))
        s = segmentation_scores(hist)
        rows.append([block, s["mean_iu"], *s["iou"]])
    scores = pd.DataFrame(rows, columns=["block", "mean IU (fail dies)", *names])
    print(scores.to_markdown(index=False, floatfmt=["g"] + [".3f"] * (len(names) + 1)))


if __name__ == "__main__":
    main()
