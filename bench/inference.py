"""Inference speed: model-only and end-to-end, real and synthetic maps, levers, roofline, the peer.

Sections (each printed as a table and saved in bench/results/inference.json):

- roofline: GFLOP/s of a large fp32 and bf16 ``torch.matmul`` and of a wide 3 x 3 convolution (the
  machine's practical peak is the better of the two, see bench.common.matmul_peak);
- levers: the default model (compact, aligned, FCN-8s) on the 12,450 real maps, from the code the
  project started with (``baseline``) through each lever, at each thread count;
- grid: preset x geometry x dtype, model-only wafers/s on real maps (a seeded sample sized to the
  model's cost) and on synthetic 64 x 64 maps, achieved GFLOP/s and share of that peak,
  peak RSS;
- end-to-end: the nightly task's own code path (read_parquet -> validate_table -> Scorer.score_table ->
  write_parquet_atomic) on the real file and on a synthetic 64 x 64 file;
- accuracy: a trained compact FCN-8s (bench.trained), fp32 vs bf16 vs the baseline code: label
  agreement on fail dies and mean IU on the synthetic test split;
- peer: torchvision fcn_resnet50 vs the compact FCN-8s at the same batch and size;
- GPU: measured when CUDA is present, otherwise recorded as not measured.

    python -m bench.inference [--repeats 3] [--lever-threads 1] [--e2e-threads 1,2] [--sections levers,e2e]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from bench.common import (CACHE_DIR, NO_GPU, REAL_DATA, PeakRSS, base_parser, finish, machine_info, matmul_peak,
                          padded_die_batch, padded_gflops, print_table, real_table, set_threads,
                          synthetic_64, time_best)
from bench.peer import PEER_NAME, PeerFCN
from bench.trained import Budget, fail_die_scores, label_agreement, test_table, trained_fcn8s
from fcn_core.config import load_config
from fcn_core.data import WaferSet
from fcn_core.models import build_fcn, forward_gflops
from fcn_core.padding import crop_map
from fcn_core.inference.fastpath import fast_module, one_hot_channels_last
from fcn_core.inference.packed import PackedMaps, label_packed, packed_column, predict_packed
from fcn_core.inference.runtime import class_ids
from fcn_core.scorer import Scorer
from fcn_core.table import FAIL, die_maps, read_parquet, write_parquet_atomic
from fcn_core.validate import validate_table

N_CLASSES = 5


# -- the code the project started with (fcn_core/predict.py at commit d58f767), for "before" -----
@torch.inference_mode()
def baseline_predict(model: nn.Module, maps: list[np.ndarray], *, batch_size: int = 256) -> list[np.ndarray]:
    """The original predict_maps: WaferSet batches, NCHW input, argmax, per-map crop copies."""
    model.eval()
    wafers = WaferSet(wafer_ids=[""] * len(maps), die=list(maps))
    out: list[np.ndarray | None] = [None] * len(maps)
    for idx, batch in wafers.batches(batch_size=batch_size, with_targets=False):
        logits = model(batch.x)
        labels = logits.argmax(1).masked_fill_(batch.die != FAIL, 0).to(torch.uint8).numpy()
        for row, i in enumerate(idx):
            h, w = batch.sizes[row]
            out[i] = np.ascontiguousarray(crop_map(labels[row], h, w))
    return out  # type: ignore[return-value]


def flat(preds: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([p.ravel() for p in preds]) if preds else np.zeros(0, np.uint8)


def fresh_model(preset: str = "compact", geometry: str = "aligned", name: str = "fcn8s") -> nn.Module:
    torch.manual_seed(0)
    return build_fcn(name, n_classes=N_CLASSES, preset=preset, geometry=geometry).eval()


def fast_run(model: nn.Module, *, channels_last: bool = True, subpixel: bool = True):
    """Score packed maps with ``model``'s fast copy, made once outside the timings (as a Scorer keeps it)."""
    net = fast_module(model, channels_last=channels_last, subpixel=subpixel)
    return lambda maps, **options: label_packed(net, maps, channels_last=channels_last, **options)


# -- sections ---------------------------------------------------------------------------------------
def levers(table: pa.Table, *, threads_list: list[int], repeats: int) -> list[dict]:
    """Each lever on the default model, cumulative, model-only (plus decode timings)."""
    maps = packed_column(table)
    listed = maps.unpack()
    gflop = padded_gflops(fresh_model(), maps.heights, maps.widths)
    rows: list[dict] = []

    def add(lever: str, threads: int, fn, items: int, gf: float | None = None, **extra) -> None:
        timing = time_best(fn, repeats=repeats)
        row = {"lever": lever, "threads": threads, "wafers": items, **timing.summary(items), **extra}
        if gf is not None:
            row["gflops_per_s"] = round(gf / timing.best_s, 2)
        rows.append(row)
        print(f"  {lever:44s} {threads} thr  {row['per_s']:9,.0f}/s  (cpu {row['per_cpu_s']:9,.0f}/s, "
              f"load {max(row['load_avg']):.1f})", flush=True)

    for threads in threads_list:
        torch.set_num_threads(threads)
        print(f"levers, {threads} thread(s):", flush=True)
        add("decode: table.die_maps (per row)", threads, lambda: die_maps(table), len(maps))
        add("decode: packed_column (one frombuffer)", threads, lambda: packed_column(table), len(maps))
        m = fresh_model()
        add("baseline (original predict_maps)", threads, lambda: baseline_predict(m, listed), len(maps), gflop)
        run = fast_run(fresh_model(), channels_last=False, subpixel=False)
        add("packed + pixel-capped buckets, NCHW", threads, lambda: run(maps, bf16=False), len(maps), gflop)
        run = fast_run(fresh_model(), subpixel=False)
        add("+ channels_last", threads, lambda: run(maps, bf16=False), len(maps), gflop)
        run = fast_run(fresh_model())
        add("+ sub-pixel upsamplers (fp32)", threads, lambda: run(maps, bf16=False), len(maps), gflop)
        add("+ bf16 autocast (the default here)", threads, lambda: run(maps, bf16=True), len(maps), gflop)
        for pixels in (64 * 1024, 1024 * 1024):
            add(f"bf16 default, max_batch_pixels={pixels}", threads,
                lambda p=pixels: run(maps, max_batch_pixels=p), len(maps), gflop)
        torch.set_flush_denormal(True)
        add("bf16 default + flush denormals", threads, lambda: run(maps), len(maps), gflop)
        torch.set_flush_denormal(False)
    # argmax vs max on the channel dim: measured alone (the model's output layout, 64 maps at 64 x 64)
    logits = torch.randn(64, N_CLASSES, 64, 64)
    add("op: logits.argmax(1), 64x5x64x64", torch.get_num_threads(), lambda: logits.argmax(1), 64)
    add("op: logits.max(1).indices, 64x5x64x64", torch.get_num_threads(), lambda: class_ids(logits), 64)
    return rows


def compile_lever(*, n64: int, repeats: int) -> list[dict]:
    """torch.compile of the channels-last fp32 model on one 64 x 64 batch: compile time and speed."""
    m = fast_module(fresh_model())
    x = one_hot_channels_last(padded_die_batch(synthetic_64(n64, seed=4)))
    rows = []
    with torch.inference_mode():
        eager = time_best(lambda: class_ids(m(x)), repeats=repeats)
        rows.append({"lever": f"eager, one 64x64 batch of {n64}", "threads": torch.get_num_threads(), "wafers": n64,
                     **eager.summary(n64)})
        try:
            compiled = torch.compile(m, dynamic=False)
            t0 = time.perf_counter()
            compiled(x)
            compile_s = time.perf_counter() - t0
            timing = time_best(lambda: class_ids(compiled(x)), repeats=repeats)
            rows.append({"lever": f"torch.compile, one 64x64 batch of {n64}", "threads": torch.get_num_threads(),
                         "wafers": n64, "compile_s": round(compile_s, 1), **timing.summary(n64)})
        except Exception as exc:  # inductor needs a C++ compiler; report instead of failing the bench
            rows.append({"lever": "torch.compile", "error": f"{type(exc).__name__}: {exc}"[:300]})
    for r in rows:
        print(f"  {r['lever']:44s} {r.get('per_s', 0):9,.0f}/s  compile {r.get('compile_s', '-')} s", flush=True)
    return rows


def model_only(model: nn.Module, maps: PackedMaps, *, bf16: bool, repeats: int) -> dict:
    run = fast_run(model)
    with PeakRSS() as rss:
        timing = time_best(lambda: run(maps, bf16=bf16), repeats=repeats)
    gflop = padded_gflops(model, maps.heights, maps.widths)
    return {"wafers": len(maps), **timing.summary(len(maps)), "gflop": round(gflop, 3),
            "gflops_per_s": round(gflop / timing.best_s, 2), "peak_rss_mib": rss.peak_mib}


def grid(real: pa.Table | None, *, presets: list[str], n64: int, repeats: int, peak: dict,
         seconds_per_cell: float) -> list[dict]:
    """preset x geometry x dtype, model-only, sample sizes chosen so each cell takes ~seconds_per_cell."""
    rows = []
    syn = packed_column(synthetic_64(n64, seed=1))
    for preset in presets:
        for geometry in ("aligned", "classic"):
            model = fresh_model(preset, geometry)
            per_map_gf = forward_gflops(model, 64, 64)
            # probe speed on 2 maps, then size the samples to the time budget
            probe = PackedMaps(syn.data, syn.starts[:2], syn.heights[:2], syn.widths[:2])
            probe_run = fast_run(model)
            t0 = time.perf_counter()
            probe_run(probe)
            per_map_s = (time.perf_counter() - t0) / 2
            n_syn = int(np.clip(seconds_per_cell / max(per_map_s, 1e-6), 2, len(syn)))
            n_real = int(np.clip(1.5 * seconds_per_cell / max(per_map_s, 1e-6), 4, 12450))
            syn_maps = PackedMaps(syn.data, syn.starts[:n_syn], syn.heights[:n_syn], syn.widths[:n_syn])
            inputs = {"synthetic 64x64": syn_maps}
            if real is not None:
                inputs["real"] = packed_column(real if n_real >= real.num_rows else
                                               real.take(pa.array(np.sort(np.random.default_rng(0).choice(
                                                   real.num_rows, size=n_real, replace=False)))))
            reps = repeats if per_map_s < 0.05 else 1  # the seed-sized networks take seconds per map
            for dtype in ("fp32", "bf16"):
                for name, maps in inputs.items():
                    r = model_only(model, maps, bf16=dtype == "bf16", repeats=reps)
                    r.update({"preset": preset, "geometry": geometry, "dtype": dtype, "input": name,
                              "gflop_per_64x64_map": round(per_map_gf, 3),
                              "pct_of_peak": round(100 * r["gflops_per_s"] / peak[f"{dtype}_gflops"], 1)})
                    rows.append(r)
                    print(f"  {preset:7s} {geometry:7s} {dtype} {name:15s} {r['wafers']:6d} maps "
                          f"{r['per_s']:9,.1f}/s  {r['gflops_per_s']:7.1f} GFLOP/s", flush=True)
    return rows


def end_to_end(path: Path, *, threads_list: list[int], repeats: int, label: str) -> list[dict]:
    """The nightly task's path on one file, default model, fp32 and bf16, per thread count."""
    cfg = load_config("default")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for threads in threads_list:
            torch.set_num_threads(threads)
            for dtype in ("fp32", "bf16"):
                scorer = Scorer(model=fresh_model(), verdict=cfg.verdict, cfg=cfg)
                runs: list[dict[str, float]] = []  # stage seconds of every run, warm-up included

                def run() -> None:
                    stages: dict[str, float] = {}
                    t = time.perf_counter()
                    table = read_parquet(path)
                    stages["read"] = time.perf_counter() - t
                    t = time.perf_counter()
                    valid = validate_table(table, n_classes=cfg.n_classes).valid
                    stages["validate"] = time.perf_counter() - t
                    t = time.perf_counter()
                    scored = scorer.score_table(valid, model_name="bench", model_version="0", bf16=dtype == "bf16")
                    stages["score"] = time.perf_counter() - t
                    t = time.perf_counter()
                    write_parquet_atomic(scored, f"{tmp}/predictions.parquet")
                    stages["write"] = time.perf_counter() - t
                    stages["rows"] = scored.num_rows
                    runs.append(stages)

                with PeakRSS() as rss:
                    timing = time_best(run, repeats=repeats)
                timed = runs[-repeats:]
                best = {k: round(v, 3) for k, v in timed[int(np.argmin(timing.wall_s))].items()}
                rows.append({"input": label, "threads": threads, "dtype": dtype, "wafers": int(best["rows"]),
                             **timing.summary(best["rows"]), "stages_best_run_s": best,
                             "peak_rss_mib": rss.peak_mib})
                r = rows[-1]
                print(f"  {label:18s} {threads} thr {dtype}: best {r['best_s']:.2f} s = {r['per_s']:,.0f} wafers/s "
                      f"(median {r['median_s']:.2f} s, load {r['load_avg']}) stages {best}", flush=True)
    return rows


def accuracy(real: pa.Table | None, *, budget: Budget, n_test: int, cache_dir: Path, threads: int) -> dict:
    """bf16 vs fp32 vs the original code, with a trained model: agreement and mean IU."""
    model, info = trained_fcn8s("aligned", budget, threads=threads, cache_dir=cache_dir)
    test = test_table(n_test)
    out: dict = {"model": f"compact aligned FCN-8s, {budget.tag}", "train_info": info, "n_test": n_test}
    for name, table in (("synthetic test split", test), ("real", real)):
        if table is None:
            continue
        maps = packed_column(table)
        preds = {
            "baseline": flat(baseline_predict(model, maps.unpack())),
            "fp32": predict_packed(model, maps, bf16=False),
            "bf16": predict_packed(model, maps, bf16=True),
        }
        section: dict = {"wafers": len(maps),
                         "fail_die_agreement_fp32_vs_baseline": label_agreement(preds["fp32"], preds["baseline"], maps),
                         "fail_die_agreement_bf16_vs_fp32": label_agreement(preds["bf16"], preds["fp32"], maps)}
        if name == "synthetic test split":
            scores = {k: fail_die_scores(v, table, n_classes=N_CLASSES) for k, v in preds.items()}
            section["mean_iu"] = {k: round(s["mean_iu"], 5) for k, s in scores.items()}
            section["mean_iu_bf16_minus_fp32"] = round(scores["bf16"]["mean_iu"] - scores["fp32"]["mean_iu"], 5)
            section["mean_iu_fp32_minus_baseline"] = round(scores["fp32"]["mean_iu"] - scores["baseline"]["mean_iu"], 5)
        out[name] = section
        print(f"  {name}: {section}", flush=True)
    return out


def peer(*, batch: int, repeats: int) -> list[dict]:
    """Compact FCN-8s vs the torchvision peer, same one-hot 64 x 64 batch, fp32 and bf16."""
    x = one_hot_channels_last(padded_die_batch(synthetic_64(batch, seed=5)))
    rows = []
    models = {"compact FCN-8s (aligned)": fresh_model(), PEER_NAME: PeerFCN(N_CLASSES).eval()}
    for name, model in models.items():
        net = fast_module(model)
        gf = forward_gflops(model, 64, 64)
        for dtype in ("fp32", "bf16"):
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                timing = time_best(lambda: class_ids(net(x)), repeats=repeats)
            rows.append({"model": name, "dtype": dtype, "batch": batch, "size": "64x64", **timing.summary(batch),
                         "gflop_per_map": round(gf, 3), "gflops_per_s": round(gf * batch / timing.best_s, 2)})
    for dtype in ("fp32", "bf16"):
        ours, theirs = (r for r in rows if r["dtype"] == dtype)
        ours["speed_ratio_vs_peer"] = round(ours["per_s"] / theirs["per_s"], 1)
    return rows


def gpu_rows(*, repeats: int) -> dict | str:
    """Compact inference on the GPU (bf16, channels_last) at 64 x 64, when a GPU exists."""
    if not torch.cuda.is_available():
        return NO_GPU
    device = torch.device("cuda")
    run_fast = fast_run(fresh_model().to(device))
    maps = packed_column(synthetic_64(4096, seed=6))
    out = {"gpu": torch.cuda.get_device_name(0)}
    for batch in (1024, 4096):
        def run() -> None:
            run_fast(maps, device=device, bf16=True, batch_size=batch, max_batch_pixels=batch * 4096)
            torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        timing = time_best(run, repeats=repeats)
        out[f"batch_{batch}"] = {**timing.summary(len(maps)),
                                 "cuda_max_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--lever-threads", default="1", help="thread counts for the lever runs")
    parser.add_argument("--e2e-threads", default="1,2", help="thread counts for the end-to-end runs")
    parser.add_argument("--n64", type=int, default=256, help="synthetic 64 x 64 maps")
    parser.add_argument("--real-limit", type=int, default=None, help="use a seeded subset of the real maps")
    parser.add_argument("--cell-seconds", type=float, default=4.0, help="time budget per grid cell")
    parser.add_argument("--presets", default="compact,vgg16", help="presets of the grid")
    parser.add_argument("--peer-batch", type=int, default=32)
    parser.add_argument("--n-test", type=int, default=600, help="synthetic test wafers for the accuracy check")
    parser.add_argument("--budget", default=f"{Budget.n_train},{Budget.n_val},{Budget.epochs}",
                        help="n_train,n_val,epochs of the trained model (bench.trained)")
    parser.add_argument("--cache-dir", type=Path, default=CACHE_DIR)
    parser.add_argument("--sections", default="levers,compile,grid,e2e,accuracy,peer,gpu",
                        help="which sections to run (the roofline always runs)")
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)
    threads_list = [int(t) for t in args.lever_threads.split(",")]
    e2e_threads = [int(t) for t in args.e2e_threads.split(",")]
    sections = set(args.sections.split(","))
    n_train, n_val, epochs = (int(v) for v in args.budget.split(","))
    budget = Budget(n_train=n_train, n_val=n_val, epochs=epochs)
    payload: dict = {"machine": machine_info(), "threads": threads}
    real = real_table(args.real_limit)
    payload["real_data"] = "absent" if real is None else {"wafers": real.num_rows}

    peak = matmul_peak(n=1024 if args.n64 < 64 else 2048, repeats=args.repeats)
    payload["roofline"] = peak
    print(f"peak ({threads} thr), GFLOP/s: {peak}")

    if "levers" in sections and real is not None:
        payload["levers"] = levers(real, threads_list=threads_list, repeats=args.repeats)
        set_threads(threads)
    if "compile" in sections:
        payload["compile"] = compile_lever(n64=min(64, args.n64), repeats=args.repeats)
    if "grid" in sections:
        payload["grid"] = grid(real, presets=args.presets.split(","), n64=args.n64, repeats=args.repeats, peak=peak,
                               seconds_per_cell=args.cell_seconds)
        print_table("model-only scoring (preset x geometry x dtype)", payload["grid"],
                    ["preset", "geometry", "dtype", "input", "wafers", "per_s", "gflops_per_s",
                     "pct_of_peak", "peak_rss_mib"])
    if "e2e" in sections:
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            syn_path = Path(tmp) / "synthetic64.parquet"
            write_parquet_atomic(synthetic_64(args.n64, seed=2), syn_path)
            rows += end_to_end(syn_path, threads_list=e2e_threads, repeats=args.repeats, label="synthetic 64x64")
            if real is not None:
                real_path = REAL_DATA if args.real_limit is None else Path(tmp) / "real.parquet"
                if args.real_limit is not None:
                    write_parquet_atomic(real, real_path)
                rows += end_to_end(real_path, threads_list=e2e_threads, repeats=args.repeats, label="real (WM-811K)")
        set_threads(threads)
        payload["end_to_end"] = rows
        print_table("end to end: read_parquet -> validate -> score_table -> write_parquet_atomic", rows,
                    ["input", "threads", "dtype", "wafers", "best_s", "median_s", "per_s", "peak_rss_mib",
                     "load_avg"])
    if "accuracy" in sections:
        payload["accuracy"] = accuracy(real, budget=budget, n_test=args.n_test, cache_dir=args.cache_dir,
                                       threads=threads)
    if "peer" in sections:
        payload["peer"] = peer(batch=args.peer_batch, repeats=args.repeats)
        print_table("vs the peer, same batch, 64 x 64 one-hot input", payload["peer"],
                    ["model", "dtype", "batch", "per_s", "gflops_per_s", "speed_ratio_vs_peer"])
    if "gpu" in sections:
        payload["gpu"] = gpu_rows(repeats=args.repeats)
        print(f"\nGPU: {payload['gpu']}")
    return finish("inference", payload, results_dir=args.results_dir)


if __name__ == "__main__":
    main()
