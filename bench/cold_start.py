"""Cold start of ``wafer-fcn predict`` on a handful of wafers, against ``python -c "import torch"``.

Sets up a throw-away home with a registered champion (a compact FCN-8s with random weights: the
weights do not change the start-up cost) and 10 synthetic wafers, then times, best of N, in the
same run: a bare torch import and the whole ``wafer-fcn predict`` command (process start, config,
champion lookup, weights-only load, scoring, writing). Target (issue #14): ratio <= 1.8.

    python bench/cold_start.py [--repeats 3] [--wafers 10]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TARGET_RATIO = 1.8


def best_of(command: list[str], *, repeats: int, env: dict[str, str]) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, check=True, env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return min(times)


def prepare(home: Path, n_wafers: int) -> Path:
    """A champion in ``home``'s store and a wafer table of ``n_wafers``; returns the table's path."""
    import pyarrow.parquet as pq
    import torch

    from fcn_core.config import load_config
    from fcn_core.models import build_fcn
    from fcn_core.scorer import Scorer, save_scorer
    from fcn_core.synth import generate_wafers
    from tracking import registry, runs, store

    cfg = load_config("tiny", {"home": str(home)})
    torch.manual_seed(0)
    model = build_fcn("fcn8s", n_classes=cfg.n_classes, preset=cfg.model.preset).eval()
    bundle = save_scorer(Scorer(model=model, verdict=cfg.verdict, cfg=cfg), home / "scorer.pt")
    client = store.open_store(cfg)
    run_id = runs.start_parent_run(client, cfg, data_fingerprint="cold-start")
    registry.register_model(cfg, client=client, run_id=run_id, scorer_path=bundle, candidate_score=0.5,
                            rescore=lambda scorer: 0.0)
    runs.end_run(client, run_id)
    wafers = home / "wafers.parquet"
    pq.write_table(generate_wafers(n_wafers, seed=0, synth=cfg.data.synth, classes=cfg.classes), wafers)
    return wafers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--wafers", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="wafer-fcn-cold-") as tmp:
        home = Path(tmp)
        wafers = prepare(home, args.wafers)
        env = {**os.environ, "WAFER_FCN_HOME": str(home), "PYTHONPATH": str(REPO_ROOT),
               "MLFLOW_ENABLE_TELEMETRY": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        cli = Path(sys.executable).with_name("wafer-fcn")
        predict = [str(cli) if cli.exists() else sys.executable, *([] if cli.exists() else ["-m", "flows.cli"]),
                   "-c", "tiny", "predict", str(wafers), str(home / "predictions.parquet"), "--threads", "1"]
        torch_s = best_of([sys.executable, "-c", "import torch"], repeats=args.repeats, env=env)
        predict_s = best_of(predict, repeats=args.repeats, env=env)
    load = os.getloadavg()[0]
    ratio = predict_s / torch_s
    print(f"import torch            {torch_s:6.2f} s (best of {args.repeats})")
    print(f"wafer-fcn predict ({args.wafers:>3}) {predict_s:6.2f} s (best of {args.repeats})")
    print(f"ratio                   {ratio:6.2f} (target <= {TARGET_RATIO}; 1-min load average {load:.1f})")


if __name__ == "__main__":
    main()
