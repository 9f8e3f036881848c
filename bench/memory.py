"""Bounded memory: score N synthetic wafers (default 1,000,000), generated in chunks, through Scorer.score_table.

Each chunk is generated (fcn_core.synth.iter_wafer_chunks), scored by the default model (compact,
aligned, FCN-8s) through ``Scorer.score_table`` and reduced to a few counts, as a nightly run over many
partitions would do; the predictions are not kept. Reported: wall time split into generation and
scoring, wafers/s, and peak RSS of this process (kernel high-water mark and a 5 ms sampler).
Target: peak RSS under 4 GiB.

    python -m bench.memory [--n 1000000] [--chunk 20000] [--threads 1]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.common import (PeakRSS, base_parser, load_avg, machine_info, process_peak_rss_mib, save_results,
                          set_threads)
from fcn_core.config import load_config
from fcn_core.models import build_fcn
from fcn_core.scorer import Scorer
from fcn_core.synth import iter_wafer_chunks

RSS_LIMIT_MIB = 4096


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="wafers to generate and score")
    parser.add_argument("--chunk", type=int, default=20_000, help="wafers per generated chunk")
    parser.add_argument("--dtype", choices=("default", "fp32", "bf16"), default="default",
                        help="default: the scorer's own choice (bf16 on CPUs with native bf16)")
    parser.add_argument("--progress-every", type=int, default=10, help="print a line every this many chunks")
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)
    cfg = load_config("default")
    torch.manual_seed(0)
    scorer = Scorer(model=build_fcn("fcn8s", n_classes=cfg.n_classes, preset="compact", geometry="aligned").eval(),
                    verdict=cfg.verdict, cfg=cfg)
    payload: dict = {"machine": machine_info(), "threads": threads, "n": args.n, "chunk": args.chunk,
                     "dtype": args.dtype, "rss_before_mib": process_peak_rss_mib()}
    bf16 = {"default": None, "fp32": False, "bf16": True}[args.dtype]
    gen_s = score_s = 0.0
    scored = fail_dies = chunks = 0
    loads = []
    start = time.perf_counter()
    with PeakRSS(interval_s=0.05) as rss:
        t = time.perf_counter()
        for table in iter_wafer_chunks(args.n, args.chunk, seed=11):
            gen_s += time.perf_counter() - t
            t = time.perf_counter()
            out = scorer.score_table(table, model_name="bench", model_version="0", bf16=bf16)
            score_s += time.perf_counter() - t
            scored += out.num_rows
            fail_dies += int(out.column("fail_dies").to_numpy().sum())
            chunks += 1
            loads.append(load_avg())
            if chunks % args.progress_every == 0:
                elapsed = time.perf_counter() - start
                print(f"  {scored:,} wafers in {elapsed:,.0f} s ({scored / elapsed:,.0f}/s overall, scoring "
                      f"{scored / score_s:,.0f}/s), peak RSS {rss.peak_mib:,.0f} MiB, load {loads[-1]}", flush=True)
            del table, out
            t = time.perf_counter()
    wall = time.perf_counter() - start
    payload.update({
        "wafers_scored": scored, "fail_dies": fail_dies, "wall_s": round(wall, 1),
        "generate_s": round(gen_s, 1), "score_s": round(score_s, 1),
        "wafers_per_s_overall": round(scored / wall, 1), "wafers_per_s_scoring": round(scored / score_s, 1),
        "peak_rss_mib_sampled": rss.peak_mib, "peak_rss_mib": process_peak_rss_mib(),
        "rss_limit_mib": RSS_LIMIT_MIB, "load_avg_min_max": [min(loads, default=0.0), max(loads, default=0.0)],
    })
    payload["under_limit"] = payload["peak_rss_mib"] < RSS_LIMIT_MIB
    print(f"\n{scored:,} wafers: {wall:,.1f} s ({gen_s:,.1f} s generating, {score_s:,.1f} s scoring), "
          f"{payload['wafers_per_s_scoring']:,.0f} wafers/s scoring; peak RSS {payload['peak_rss_mib']:,.0f} MiB "
          f"(limit {RSS_LIMIT_MIB:,}: {'ok' if payload['under_limit'] else 'EXCEEDED'})")
    path = save_results("memory", payload, results_dir=args.results_dir)
    print(f"saved {path}")
    return payload


if __name__ == "__main__":
    main()
