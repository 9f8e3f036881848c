"""Run every benchmark (``make bench``): geometry, inference, training, memory, each in its own process.

Each script prints its tables and writes bench/results/<name>.json. A separate process per script
keeps peak-RSS figures clean. Extra arguments after ``--`` are not supported on purpose: run a
script directly (``python -m bench.inference --help``) to change its sizes.

    python bench/run_all.py [--only inference,training] [--threads 1] [--memory-n 1000000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ("geometry", "inference", "training", "memory")  # geometry first: it trains the models the others reuse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(SCRIPTS), help=f"comma-separated subset of {SCRIPTS}")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for every script")
    parser.add_argument("--memory-n", type=int, default=1_000_000, help="wafers for bench.memory")
    args = parser.parse_args(argv)
    chosen = [s for s in args.only.split(",") if s]
    unknown = sorted(set(chosen) - set(SCRIPTS))
    if unknown:
        parser.error(f"unknown script(s) {unknown}; choose from {SCRIPTS}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    failed = []
    for name in chosen:
        cmd = [sys.executable, "-m", f"bench.{name}"]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if name == "memory":
            cmd += ["--n", str(args.memory_n)]
        print(f"\n=== {' '.join(cmd[1:])} (load {os.getloadavg()[0]:.2f})", flush=True)
        t0 = time.perf_counter()
        code = subprocess.call(cmd, cwd=REPO_ROOT, env=env)
        print(f"=== {name}: exit {code} after {time.perf_counter() - t0:,.0f} s", flush=True)
        if code:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
