"""Shared pieces of the benchmark scripts: machine facts, timing under load, results files.

The bench machine is shared, so every timing is best-of-N with the 1-minute load average
recorded next to it; CPU seconds of this process are recorded too (other processes' load
inflates wall time far more than it inflates CPU time at one thread).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow as pa
import torch

from fcn_core.settings import CHECKOUT_REAL_DATA, REAL_VALIDATION_MAPS, settings

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
REAL_DATA = (settings().real_data_dir() or CHECKOUT_REAL_DATA) / REAL_VALIDATION_MAPS  # $WAFER_FCN_REAL_DATA: a folder
CACHE_DIR = REPO_ROOT / "var" / "bench"  # trained models for accuracy checks (git-ignored)
NO_GPU = "not measured: no GPU available in this session"
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


# -- machine -------------------------------------------------------------------------------------
def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gpu_info() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return NO_GPU


def machine_info() -> dict[str, Any]:
    flags = _cpu_flags()
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_flags": {f: f in flags for f in CPU_FLAGS},
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
        "gpu": gpu_info(),
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
    }


def load_avg() -> float:
    return round(os.getloadavg()[0], 2)


# -- timing --------------------------------------------------------------------------------------
@dataclass
class Timing:
    """Wall and CPU seconds of each run; ``best_s`` is the fastest wall time."""

    wall_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    load: list[float] = field(default_factory=list)  # 1-minute load average before each run

    @property
    def best_s(self) -> float:
        return min(self.wall_s)

    @property
    def median_s(self) -> float:
        return statistics.median(self.wall_s)

    @property
    def best_cpu_s(self) -> float:
        return min(self.cpu_s)

    def summary(self, items: float | None = None) -> dict[str, Any]:
        """Seconds (best, median, CPU), load and, given ``items`` per run, items/s of the best run."""
        out: dict[str, Any] = {"best_s": round(self.best_s, 4), "median_s": round(self.median_s, 4),
                               "best_cpu_s": round(self.best_cpu_s, 4), "runs": len(self.wall_s),
                               "load_avg": [round(x, 2) for x in self.load]}
        if items is not None:
            out["per_s"] = round(items / self.best_s, 2)
            out["per_cpu_s"] = round(items / self.best_cpu_s, 2)
        return out


def time_best(fn: Callable[[], Any], *, repeats: int = 3, warmup: int = 1) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed."""
    for _ in range(warmup):
        fn()
    timing = Timing()
    for _ in range(repeats):
        timing.load.append(load_avg())
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        timing.cpu_s.append(time.process_time() - cpu)
        timing.wall_s.append(time.perf_counter() - wall)
    return timing


class PeakRSS:
    """Peak resident set size of this process while the block runs (sampled every 5 ms), in MiB."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._proc = psutil.Process()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mib = max(self.peak_mib, self._proc.memory_info().rss / 2**20)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakRSS":
        self.peak_mib = self._proc.memory_info().rss / 2**20
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mib = round(max(self.peak_mib, self._proc.memory_info().rss / 2**20), 1)


def process_peak_rss_mib() -> float:
    """Peak RSS of this whole process so far (the kernel's high-water mark), in MiB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def matmul_peak(*, n: int = 2048, repeats: int = 5) -> dict[str, Any]:
    """The machine's practical compute ceiling, fp32 and bf16: the best of an n x n x n torch.matmul
    (BLAS: MKL here) and a wide 3 x 3 convolution (oneDNN, the library the FCNs run on).

    Both are reported: on this AMD CPU MKL's matmul stays well below what oneDNN's convolutions reach.
    """
    out: dict[str, Any] = {"n": n, "threads": torch.get_num_threads()}
    c, hw = max(64, n // 8), 32  # conv: batch 8, c -> c channels, 32 x 32, channels-last
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        mm = time_best(lambda: torch.matmul(a, b), repeats=repeats)
        x = torch.randn(8, c, hw, hw).to(dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(c, c, 3, 3).to(dtype).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            conv = time_best(lambda: torch.nn.functional.conv2d(x, w, padding=1), repeats=repeats)
        out[f"{name}_matmul_gflops"] = round(2 * n**3 / mm.best_s / 1e9, 1)
        out[f"{name}_conv_gflops"] = round(2 * 8 * c * c * 9 * hw * hw / conv.best_s / 1e9, 1)
        out[f"{name}_gflops"] = max(out[f"{name}_matmul_gflops"], out[f"{name}_conv_gflops"])
        out[f"{name}_load_avg"] = mm.load + conv.load
    return out


# -- data ------------------------------------------------------------------------------------------
def real_table(limit: int | None = None, *, seed: int = 0) -> pa.Table | None:
    """The 12,450 real WM-811K maps (or a seeded random subset of ``limit``); None if absent."""
    if not REAL_DATA.exists():
        return None
    from fcn_core.table import read_parquet

    table = read_parquet(REAL_DATA)
    if limit is not None and limit < table.num_rows:
        pick = np.sort(np.random.default_rng(seed).choice(table.num_rows, size=limit, replace=False))
        table = table.take(pa.array(pick))
    return table


def synthetic_64(n: int, *, seed: int = 0) -> pa.Table:
    """``n`` generated wafers whose grids (49..64 dies a side) all pad to 64 x 64."""
    from fcn_core.config import SynthConfig
    from fcn_core.synth import generate_wafers

    synth = SynthConfig(size_min=49, size_max=64, size_mode=60.0, size_median=62.0, size_sigma=0.1)
    return generate_wafers(n, seed=seed, synth=synth)


def padded_die_batch(table: pa.Table, size: int = 64) -> torch.Tensor:
    """(N, size, size) uint8 die states of a table's maps, padded with no-die at the bottom/right."""
    from fcn_core.inference.packed import packed_column

    maps = packed_column(table)
    out = np.zeros((len(maps), size, size), np.uint8)
    for i, m in enumerate(maps.unpack()):
        out[i, :m.shape[0], :m.shape[1]] = m
    return torch.from_numpy(out)


def padded_gflops(model: torch.nn.Module, heights: Iterable[int], widths: Iterable[int], *,
                  multiple: int = 32, fixed: int | None = None) -> float:
    """Forward GFLOPs of scoring maps of these sizes (each at its padded shape)."""
    from fcn_core.models import forward_gflops
    from fcn_core.padding import padded_shape

    shapes: dict[tuple[int, int], int] = {}
    for h, w in zip(heights, widths):
        key = padded_shape(int(h), int(w), multiple=multiple, fixed=fixed)
        shapes[key] = shapes.get(key, 0) + 1
    return sum(n * forward_gflops(model, H, W) for (H, W), n in shapes.items())


# -- results ---------------------------------------------------------------------------------------
def save_results(name: str, payload: dict[str, Any], *, results_dir: Path | None = None) -> Path:
    """Write ``<results_dir>/<name>.json`` atomically (a temporary name, then rename)."""
    folder = Path(results_dir) if results_dir else RESULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=_jsonable) + "\n")
    tmp.replace(path)
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def print_table(title: str, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """A plain fixed-width table on stdout (readable in CI logs)."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 10 else f"{v:,.0f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where <name>.json goes")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (best is reported)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice, one per core)")
    return parser


def set_threads(threads: int | None) -> int:
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def finish(name: str, payload: dict[str, Any], *, results_dir: Path | None = None) -> dict[str, Any]:
    """Stamp the closing load average, save ``bench/results/<name>.json`` and say where."""
    payload["load_avg_1m_at_end"] = load_avg()
    path = save_results(name, payload, results_dir=results_dir)
    print(f"\nsaved {path}")
    return payload
