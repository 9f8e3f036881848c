"""Markdown tables from bench/results/*.json, for docs/performance.md.

    python -m bench.report > /tmp/tables.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS_DIR


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 10 else f"{v:,.0f}"
    if isinstance(v, list):
        return "–".join(_fmt(x) for x in (min(v), max(v))) if v and min(v) != max(v) else _fmt(v[0]) if v else ""
    return str(v)


def table(rows: list[dict], columns: dict[str, str]) -> str:
    """``columns``: key -> header. Missing keys print empty."""
    import pandas as pd

    cells = pd.DataFrame([[_fmt(r.get(k, "")) for k in columns] for r in rows], columns=list(columns.values()))
    return cells.to_markdown(index=False, disable_numparse=True)  # cells are formatted by _fmt already


def machine_line(data: dict) -> str:
    m = data["machine"]
    flags = ", ".join(f for f, on in m["cpu_flags"].items() if on)
    return (f"{m['cpu_model']}, {m['cpu_cores']} cores ({flags}), {m['memory_gib']} GiB, torch {m['torch']}, "
            f"{data.get('threads', m['torch_threads'])} thread(s) unless a row says otherwise, {m['date']}, "
            f"GPU: {m['gpu']}")


def render(results_dir: Path = RESULTS_DIR) -> str:
    out: list[str] = []

    def load(name: str) -> dict | None:
        path = results_dir / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    if inf := load("inference"):
        out += ["## inference.json", machine_line(inf), ""]
        out += [f"Roofline: {inf['roofline']}", ""]
        if "levers" in inf:
            out += [table(inf["levers"], {"lever": "lever", "threads": "threads", "per_s": "wafers/s (best)",
                                          "per_cpu_s": "wafers per CPU-s", "gflops_per_s": "GFLOP/s",
                                          "load_avg": "load"}), ""]
        if "compile" in inf:
            out += [table(inf["compile"], {"lever": "lever", "per_s": "wafers/s", "compile_s": "compile s",
                                           "load_avg": "load"}), ""]
        if "grid" in inf:
            out += [table(inf["grid"], {"preset": "preset", "geometry": "geometry", "dtype": "dtype", "input": "input",
                                        "wafers": "maps", "per_s": "wafers/s", "gflops_per_s": "GFLOP/s",
                                        "pct_of_peak": "% of peak", "peak_rss_mib": "peak RSS MiB",
                                        "load_avg": "load"}), ""]
        if "end_to_end" in inf:
            rows = [{**r, **{f"st_{k}": v for k, v in r["stages_best_run_s"].items()}} for r in inf["end_to_end"]]
            out += [table(rows, {"input": "input", "threads": "threads", "dtype": "dtype", "wafers": "wafers",
                                 "best_s": "best s", "median_s": "median s", "per_s": "wafers/s",
                                 "st_read": "read", "st_validate": "validate", "st_score": "score",
                                 "st_write": "write", "peak_rss_mib": "peak RSS MiB", "load_avg": "load"}), ""]
        if "accuracy" in inf:
            out += [f"Accuracy: {json.dumps({k: v for k, v in inf['accuracy'].items() if k != 'train_info'})}", ""]
        if "peer" in inf:
            out += [table(inf["peer"], {"model": "model", "dtype": "dtype", "batch": "batch", "per_s": "wafers/s",
                                        "gflops_per_s": "GFLOP/s", "speed_ratio_vs_peer": "ours / peer",
                                        "load_avg": "load"}), ""]
        out += [f"GPU: {inf.get('gpu')}", ""]
    if tr := load("training"):
        out += ["## training.json", machine_line(tr), ""]
        if "train_stage" in tr:
            out += [table(tr["train_stage"], {"stage": "stage", "threads": "threads", "batch": "batch",
                                              "wafers_per_s": "wafers/s", "load_avg": "load"}), ""]
        if "step_levers" in tr:
            out += [table(tr["step_levers"], {"stage": "stage", "lever": "lever", "threads": "threads",
                                              "per_s": "wafers/s (best)", "per_cpu_s": "wafers per CPU-s",
                                              "load_avg": "load"}), ""]
        if "models" in tr:
            out += [table(tr["models"], {"model": "model", "dtype": "dtype", "batch": "batch", "per_s": "wafers/s",
                                         "train_gflops_per_s": "GFLOP/s (3x fwd)",
                                         "speed_ratio_vs_peer": "ours / peer", "load_avg": "load"}), ""]
        out += [f"GPU: {tr.get('gpu')}", ""]
    if geo := load("geometry"):
        out += ["## geometry.json", machine_line(geo), ""]
        rows = [{"geometry": r["geometry"], "input": k, **v} for r in geo["speed"] for k, v in r.items()
                if isinstance(v, dict)]
        out += [table(rows, {"geometry": "geometry", "input": "input", "wafers": "maps", "per_s": "wafers/s",
                             "gflops_per_s": "GFLOP/s", "load_avg": "load"}), ""]
        out += [f"aligned / classic speed: {geo['aligned_over_classic_speed']}", ""]
        if "accuracy" in geo:
            out += [table(geo["accuracy"]["rows"], {k: k for k in geo["accuracy"]["rows"][0]}), ""]
    if mem := load("memory"):
        out += ["## memory.json", machine_line(mem), "",
                table([mem], {"wafers_scored": "wafers", "chunk": "chunk", "wall_s": "wall s",
                              "generate_s": "generating s", "score_s": "scoring s",
                              "wafers_per_s_scoring": "scoring wafers/s", "peak_rss_mib": "peak RSS MiB",
                              "load_avg_min_max": "load"}), ""]
    return "\n".join(out)


if __name__ == "__main__":
    print(render(Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS_DIR))
