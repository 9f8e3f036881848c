"""Soak: many consecutive synthetic nights through the nightly flow, checked after every step.

For each night (one date partition, 200-500 wafers plus a few repeated wafer ids that ingest must
quarantine): the ``nightly-inference`` flow ingests the drop and scores it; the same run again
must score nothing and change no file. Once, in the middle, the night is bigger and spans three
dates, and a ``wafer-fcn nightly`` process scoring it is killed with SIGKILL as soon as its first
predictions file lands; a re-run must finish the night. After every step:

- curated rows == valid rows sent so far, quarantined rows == repeated rows sent so far;
- predictions: one row per curated wafer, zero duplicate wafer ids;
- the watermark: every partition's recorded part files == its curated part files (or, right after
  the kill, a subset), its recorded row count == its predictions file's rows;
- a re-run scores 0 wafers and leaves every predictions file byte-identical.

A tiny model is trained once at the start (its own home, so its training data is not in the
nightly store), or reused with ``--model-home``. The flows report to a Prefect server the script
starts on a free loopback port and stops at the end (also the killed run's, so no orphan).
Prints totals and the elapsed time; exits 1 on the first failed check.

    python bench/soak.py                      # 20 nights: 191 s on the shared 2-core machine
    python bench/soak.py --nights 2 --kill-night 1 --model-home var/bench/soak-model
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO_ROOT = Path(__file__).resolve().parent.parent
FIRST_NIGHT = dt.date(2026, 6, 1)
REPEATED_ROWS = 2  # per night: rows repeating a wafer id of the same drop (quarantined as duplicates)
KILL_NIGHT_DATES = 3
KILL_NIGHT_WAFERS = 1500


class SoakFailure(AssertionError):
    """A check failed: the message says which night, which step, what was expected."""


def check(ok: bool, what: str) -> None:
    if not ok:
        raise SoakFailure(what)


# -- processes --------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_prefect_server(home: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    log = open(home / "prefect-server.log", "ab")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                             str(port), "--analytics-off"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SoakFailure(f"prefect server exited at start-up; see {home / 'prefect-server.log'}")
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2) as response:
                if response.status == 200:
                    return proc, api
        except OSError:
            time.sleep(0.5)
    stop(proc)
    raise SoakFailure(f"prefect server did not answer within 120 s; see {home / 'prefect-server.log'}")


def stop(proc: subprocess.Popen, grace: float = 20) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# -- the store's state --------------------------------------------------------------------------------
class Store:
    """Reads the curated store, the predictions and the watermark of one home."""

    def __init__(self, home: Path):
        self.home = home
        self.curated = home / "curated"
        self.predictions = home / "predictions"

    def curated_ids(self) -> list[str]:
        import pyarrow.parquet as pq

        return [i for p in sorted(self.curated.glob("date=*/part-*.parquet"))
                for i in pq.read_table(p, columns=["wafer_id"]).column(0).to_pylist()]

    def quarantined_rows(self) -> int:
        import pyarrow.parquet as pq

        return sum(pq.ParquetFile(p).metadata.num_rows for p in (self.curated / "_quarantine").glob("*.parquet"))

    def predicted(self) -> dict[str, list[str]]:
        """date -> wafer ids of its predictions file."""
        import pyarrow.parquet as pq

        return {p.parent.name.removeprefix("date="): pq.read_table(p, columns=["wafer_id"]).column(0).to_pylist()
                for p in sorted(self.predictions.glob("date=*/predictions.parquet"))}

    def digests(self) -> dict[str, str]:
        return {str(p.relative_to(self.predictions)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(self.predictions.glob("date=*/predictions.parquet"))}

    def leftovers(self) -> list[str]:
        """Temporary files a finished (not killed) run must not leave behind."""
        return sorted(str(p.relative_to(self.home)) for root in (self.curated, self.predictions) if root.exists()
                      for p in root.rglob("*") if p.is_file() and ".tmp" in p.name)

    def verify(self, *, valid: int, repeated: int, complete: bool, where: str) -> dict[str, int]:
        """Every invariant; ``complete=False`` (right after a kill) allows partitions not scored yet."""
        from tasks.scoring import part_files
        from fcn_core.watermark import WATERMARK_NAME, Watermark

        curated = self.curated_ids()
        check(len(curated) == valid, f"{where}: {len(curated)} curated rows, expected {valid}")
        check(len(set(curated)) == len(curated), f"{where}: duplicate wafer ids in the curated store")
        quarantined = self.quarantined_rows()
        check(quarantined == repeated, f"{where}: {quarantined} quarantined rows, expected {repeated}")
        by_date = self.predicted()
        ids = [i for rows in by_date.values() for i in rows]
        dups = sum(n - 1 for n in Counter(ids).values() if n > 1)
        check(dups == 0, f"{where}: {dups} duplicate wafer ids in the predictions")
        check(set(ids) <= set(curated), f"{where}: predictions for wafers that are not curated")
        if complete:
            check(len(ids) == valid, f"{where}: {len(ids)} prediction rows, expected {valid}")
        watermark = Watermark.load(self.predictions / WATERMARK_NAME)
        for date in sorted({p.name.removeprefix("date=") for p in self.curated.glob("date=*")}):
            entry = watermark.partitions.get(date)
            parts = set(part_files(str(self.curated), date))
            if entry is None:
                check(not complete, f"{where}: partition {date} missing from the watermark")
                continue
            check(set(entry["parts"]) <= parts, f"{where}: watermark of {date} names parts that are not curated")
            if complete:
                check(set(entry["parts"]) == parts, f"{where}: watermark of {date} misses part files")
            check(entry["rows"] == len(by_date.get(date, [])),
                  f"{where}: watermark says {entry['rows']} rows for {date}, predictions hold "
                  f"{len(by_date.get(date, []))}")
        return {"curated": len(curated), "predicted": len(ids), "quarantined": quarantined,
                "watermarked": sum(e["rows"] for e in watermark.partitions.values())}


# -- nights ---------------------------------------------------------------------------------------------
def write_drop(folder: Path, night: int, wafers: int, dates: int) -> tuple[Path, int]:
    """An unlabelled production drop for ``night``: (path, valid rows); REPEATED_ROWS rows repeat ids."""
    import pyarrow as pa

    from fcn_core.config import SynthConfig
    from fcn_core.synth import generate_wafers
    from fcn_core.table import write_parquet_atomic

    day = FIRST_NIGHT + dt.timedelta(days=night * KILL_NIGHT_DATES)  # room for a multi-date night
    table = generate_wafers(wafers, seed=10_000 + night, synth=SynthConfig(size_max=40, nights=dates),
                            start_date=day)
    table = table.set_column(table.schema.get_field_index("label_map"), "label_map",
                             pa.nulls(table.num_rows, pa.binary()))
    path = folder / f"night-{night:03d}.parquet"
    write_parquet_atomic(pa.concat_tables([table, table.slice(0, REPEATED_ROWS)]), path)
    return path, table.num_rows


def nightly(source: Path):
    from flows.nightly_inference import NightlyResult, nightly_inference
    from flows.params import NightlyParams

    result = nightly_inference(NightlyParams(config="tiny", source=str(source)))
    check(isinstance(result, NightlyResult), f"nightly-inference did not complete: {result}")
    return result


def killed_nightly(store: Store, source: Path, env: dict[str, str]) -> int:
    """Start ``wafer-fcn nightly`` on ``source`` and SIGKILL it when its first new predictions file
    lands; returns how many predictions files of this night existed at the kill."""
    before = set(store.digests())
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "-c", "tiny", "nightly", "--source", str(source)],
                            env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if set(p.relative_to(store.predictions).as_posix() for p in
                   store.predictions.glob("date=*/predictions.parquet")) - before:
                break
            time.sleep(0.02)
        check(proc.poll() is None, f"the nightly to kill exited ({proc.returncode}) before it wrote predictions")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return len(set(store.digests()) - before)


def train_model(model_home: Path) -> None:
    from flows.params import TrainParams
    from flows.train_fcn import train_fcn

    result = train_fcn(TrainParams(config="tiny", overrides={"home": str(model_home), "train.final_stage": "fcn8s"}))
    check(result.get("alias") == "champion", f"the tiny training did not register a champion: {result}")


# -- main -------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nights", type=int, default=20)
    parser.add_argument("--min-wafers", type=int, default=200)
    parser.add_argument("--max-wafers", type=int, default=500)
    parser.add_argument("--kill-night", type=int, default=None, help="0-based night to kill; default: the middle")
    parser.add_argument("--model-home", type=Path, default=None,
                        help="a home whose mlflow.db has wafer-fcn@champion (default: train a tiny one first)")
    parser.add_argument("--home", type=Path, default=None, help="soak home (default: a temporary folder, removed)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0 < args.min_wafers <= args.max_wafers or args.nights < 1:
        parser.error("need 1 <= nights and 0 < min-wafers <= max-wafers")
    args.kill_night = args.nights // 2 if args.kill_night is None else args.kill_night
    if not 0 <= args.kill_night < args.nights:
        parser.error(f"--kill-night must be in 0..{args.nights - 1}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="wafer-fcn-soak-"))
    home = (args.home or scratch / "home").resolve()
    model_home = (args.model_home or scratch / "model").resolve()
    home.mkdir(parents=True, exist_ok=True)
    (scratch / "drops").mkdir()
    env = dict(os.environ, WAFER_FCN_HOME=str(home), PREFECT_HOME=str(home / "prefect"),
               MLFLOW_TRACKING_URI=f"sqlite:///{model_home / 'mlflow.db'}", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               MLFLOW_ENABLE_TELEMETRY="false", DO_NOT_TRACK="1")
    Path(env["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    server, api = start_prefect_server(home, env)
    env["PREFECT_API_URL"] = api
    os.environ.update(env)  # before prefect is imported: this process's flows report to that server
    store = Store(home)
    totals = Counter()
    try:
        import logging

        logging.getLogger("mlflow").setLevel(logging.ERROR)
        if args.model_home is None or not (model_home / "mlflow.db").exists():
            t = time.perf_counter()
            train_model(model_home)
            totals["train_s"] = round(time.perf_counter() - t)
            print(f"trained a tiny model in {totals['train_s']} s ({model_home})")
        rng = random.Random(args.seed)
        valid = repeated = 0
        for night in range(args.nights):
            killed = night == args.kill_night
            wafers = KILL_NIGHT_WAFERS if killed else rng.randint(args.min_wafers, args.max_wafers)
            source, n_valid = write_drop(scratch / "drops", night, wafers, KILL_NIGHT_DATES if killed else 1)
            valid, repeated = valid + n_valid, repeated + REPEATED_ROWS
            where = f"night {night + 1}/{args.nights}"
            t = time.perf_counter()
            if killed:
                files_at_kill = killed_nightly(store, source, env)
                state = store.verify(valid=valid, repeated=repeated, complete=False, where=f"{where} after kill -9")
                totals["killed_runs"] += 1
                pending = valid - state["watermarked"]  # a file written but not yet recorded is redone
                print(f"{where}: kill -9 with {files_at_kill}/{KILL_NIGHT_DATES} partition files written, "
                      f"{state['predicted']}/{valid} wafers predicted, {pending} not in the watermark (to score)")
            else:
                pending = n_valid
            result = nightly(source)
            check(result.wafers_scored == pending,
                  f"{where}: scored {result.wafers_scored} wafers, expected {pending}")
            store.verify(valid=valid, repeated=repeated, complete=True, where=f"{where} scored")
            check(store.leftovers() == [], f"{where}: temporary files left: {store.leftovers()}")
            digests = store.digests()
            again = nightly(source)
            check(again.wafers_scored == 0, f"{where}: the re-run scored {again.wafers_scored} wafers")
            check(store.digests() == digests, f"{where}: the re-run changed a predictions file")
            store.verify(valid=valid, repeated=repeated, complete=True, where=f"{where} re-run")
            totals["nights"] += 1
            totals["flow_runs"] += 2
            totals["wafers_scored"] += result.wafers_scored
            print(f"{where}: {n_valid} wafers (+{REPEATED_ROWS} quarantined), scored {result.wafers_scored}, "
                  f"re-run scored 0; totals {valid} curated = {valid} predicted, 0 duplicates "
                  f"({time.perf_counter() - t:.1f} s)")
        elapsed = time.perf_counter() - t0
        print(f"\nSOAK PASSED: {totals['nights']} nights, {valid} wafers curated and predicted once each "
              f"({repeated} repeated rows quarantined), {totals['flow_runs']} nightly flow runs + "
              f"{totals['killed_runs']} killed with -9, 0 duplicates, watermark consistent after every step; "
              f"{elapsed:.0f} s in all" + (f" (training {totals['train_s']} s)" if totals["train_s"] else ""))
        return 0
    except SoakFailure as exc:
        print(f"\nSOAK FAILED after {time.perf_counter() - t0:.0f} s: {exc}", file=sys.stderr)
        return 1
    finally:
        try:
            if "prefect.logging.handlers" in sys.modules:  # the flows' last log lines go out before the server stops
                sys.modules["prefect.logging.handlers"].APILogHandler().flush()
        finally:
            stop(server)
        if args.home is None or args.model_home is None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
