"""Print a Markdown table of FCN parameter counts and forward GFLOPs (docs/models.md has the output).

    .venv/bin/python scripts/model_table.py                 # counts only (instant: meta tensors)
    .venv/bin/python scripts/model_table.py --time --train --presets compact  # + measured CPU times

GFLOPs: torch.utils.flop_counter.FlopCounterMode for one map of --size (a multiply-add is 2 FLOPs).
"""

from __future__ import annotations

import argparse
import time

import torch

from fcn_core.models import GEOMETRIES, PRESETS, build_fcn, count_parameters, forward_gflops
from fcn_core.stages import STAGES, stage_title


def best_seconds(fn, repeat: int) -> float:
    fn()  # warm-up: allocator, oneDNN primitive cache
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def time_model(name: str, preset: str, geometry: str, *, n_classes: int, size: int, batch: int,
               repeat: int, train: bool) -> tuple[float, float | None]:
    """(forward ms per map, forward+backward+AdamW-step ms per map or None) on the CPU, best of ``repeat``."""
    model = build_fcn(name, n_classes=n_classes, preset=preset, geometry=geometry)
    x = torch.zeros(batch, 3, size, size)
    x[:, 1] = 1  # all pass dies
    target = torch.randint(0, n_classes, (batch, size, size))
    model.eval()
    with torch.inference_mode():
        fwd = best_seconds(lambda: model(x), repeat)
    if not train:
        return 1e3 * fwd / batch, None
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), target).backward()
        opt.step()

    train = best_seconds(step, repeat)
    return 1e3 * fwd / batch, 1e3 * train / batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="square input side (default 64)")
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--geometries", nargs="+", default=list(GEOMETRIES), choices=list(GEOMETRIES))
    parser.add_argument("--time", action="store_true", help="also time the forward pass on the CPU")
    parser.add_argument("--train", action="store_true", help="with --time: also time a train step")
    parser.add_argument("--batch", type=int, default=8, help="batch for --time (default 8)")
    parser.add_argument("--repeat", type=int, default=3, help="timed repeats, best kept (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads for --time")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    header = ["model", "preset", "geometry", "parameters", f"GFLOPs ({args.size}x{args.size})"]
    if args.time:
        header.append(f"fwd ms/map (batch {args.batch})")
        if args.train:
            header.append(f"train step ms/map (batch {args.batch})")
    print("| " + " | ".join(header) + " |")
    print("| " + " | ".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + " |")
    for preset in args.presets:
        for geometry in args.geometries:
            for name in STAGES:
                with torch.device("meta"):  # shapes only: the vgg16 table costs nothing
                    model = build_fcn(name, n_classes=args.classes, preset=preset, geometry=geometry)
                row = [stage_title(name), preset, geometry, f"{count_parameters(model):,}",
                       f"{forward_gflops(model, args.size, args.size):.3f}"]
                if args.time:
                    fwd, train = time_model(name, preset, geometry, n_classes=args.classes, size=args.size,
                                            batch=args.batch, repeat=args.repeat, train=args.train)
                    row += [f"{fwd:.2f}"] + ([] if train is None else [f"{train:.2f}"])
                print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
