"""Screenshots of what a yield engineer opens first, taken in a real browser (headless Chromium).

Not part of CI. After ``make demo`` (or on any home with a training and a nightly run)::

    .venv/bin/python scripts/screenshots.py --home var                       # MLflow pages
    .venv/bin/python scripts/screenshots.py --home var --prefect-url http://127.0.0.1:4200

It starts ``mlflow ui`` on a free port against the home's store (read only: nothing is written
to the store), finds the newest training run, the champion version and the newest nightly run
through the MLflow API, and saves, in ``--out`` (default docs/img):

    mlflow_runs.png           the training experiment's runs table (score columns view)
    mlflow_run.png            the champion's training parent run (else the newest training)
    mlflow_ladder.png         the experiment's test-score charts: stage on x (0 = FCN-32s ...), a line per training
    mlflow_version.png        the champion's registered version
    mlflow_logged_model.png   the champion's logged model (shows the version it is registered as)
    mlflow_nightly.png        the newest nightly run
    mlflow_nightly_trend.png  the nightly experiment's charts: one point per night (date axis) for each count and rate
    mlflow_nightly_picture.png   the newest nightly run's picture of the night's most affected wafers (artifact view)
    prefect_nightly_artifact.png   with --prefect-url: the newest nightly flow run's Markdown artifact

Needs Debian's ``chromium`` (``apt-get install chromium``) or ``--chromium PATH``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIZES = {"mlflow_runs": "1900,800", "mlflow_version": "1400,1500", "mlflow_run": "1400,1300",
         "mlflow_ladder": "1600,1000", "mlflow_nightly_trend": "1600,1100"}  # else --size
BUDGETS = {"mlflow_ladder": 60000, "mlflow_nightly_trend": 60000}  # ms; the charts draw late (else --budget-ms)
sys.path.insert(0, str(REPO))


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_http(url: str, *, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    raise SystemExit(f"{url} did not answer within {timeout:.0f} s")


def start_mlflow_ui(tracking_uri: str, host: str, port: int, log_path: Path) -> subprocess.Popen:
    mlflow = Path(sys.executable).with_name("mlflow")
    address = f"{host}:{port}"
    command = [str(mlflow) if mlflow.exists() else "mlflow", "ui", "--backend-store-uri", tracking_uri,
               "--host", host, "--port", str(port), "--workers", "1",
               "--allowed-hosts", address, "--cors-allowed-origins", f"http://{address}"]
    env = {**os.environ, "MLFLOW_ENABLE_TELEMETRY": "false", "DO_NOT_TRACK": "1"}
    return subprocess.Popen(command, stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def screenshot(chromium: str, url: str, path: Path, *, size: str, budget_ms: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="wafer-fcn-chromium-") as profile:
        command = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                   f"--user-data-dir={profile}", f"--window-size={size}", f"--virtual-time-budget={budget_ms}",
                   f"--screenshot={path}", url]
        done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    if done.returncode != 0 or not path.is_file():
        raise SystemExit(f"chromium could not capture {url}: {done.stderr.strip()[-500:]}")
    print(f"{path}  <-  {url}")
    return path


def mlflow_pages(tracking_uri: str, ui: str, *, experiment: str, model: str) -> dict[str, str]:
    """{picture name: UI address} of the newest training run, the champion and the newest nightly run."""
    from mlflow import MlflowClient

    from tracking.nightly import NIGHTLY_SUFFIX, nights_chart_url
    from tracking.runs import ladder_chart_url, runs_table_url

    client = MlflowClient(tracking_uri)
    pages: dict[str, str] = {}
    ml = "?workflowType=machine_learning"  # the UI's "Model training" mode, whatever the browser remembers
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"no experiment {experiment!r} in {tracking_uri}: run a training (make demo) first")
    pages["mlflow_runs"] = runs_table_url(ui, exp.experiment_id)
    pages["mlflow_ladder"] = ladder_chart_url(ui, exp.experiment_id)
    try:
        version = client.get_model_version_by_alias(model, "champion")
    except Exception:  # noqa: BLE001 - nothing registered: those pages are skipped
        version = None
    # the training that made the champion, else the newest training
    trainings = client.search_runs([exp.experiment_id], filter_string="tags.`wafer_fcn.run_kind` = 'training'",
                                   order_by=["attributes.start_time DESC"], max_results=1)
    run = version.run_id if version is not None and version.run_id else trainings[0].info.run_id if trainings else None
    if run:
        pages["mlflow_run"] = f"{ui}/#/experiments/{exp.experiment_id}/runs/{run}{ml}"

    if version is not None:
        pages["mlflow_version"] = f"{ui}/#/models/{model}/versions/{version.version}{ml}"
        if model_id := version.tags.get("model_id"):
            pages["mlflow_logged_model"] = f"{ui}/#/experiments/{exp.experiment_id}/models/{model_id}{ml}"
    night_exp = client.get_experiment_by_name(experiment + NIGHTLY_SUFFIX)
    if night_exp is not None:
        nights = client.search_runs([night_exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
        if nights:
            night = f"{ui}/#/experiments/{night_exp.experiment_id}/runs/{nights[0].info.run_id}"
            pages["mlflow_nightly"] = night + ml
            pages["mlflow_nightly_trend"] = nights_chart_url(ui, night_exp.experiment_id)
            pictures = client.list_artifacts(nights[0].info.run_id, "pictures")
            if pictures:
                pages["mlflow_nightly_picture"] = f"{night}/artifactPath/{pictures[0].path}{ml}"
    return pages


def prefect_artifact_page(prefect_url: str, *, flow: str = "nightly-inference") -> str | None:
    """UI address of the newest ``flow`` run's Markdown artifact, via the Prefect REST API."""
    base = prefect_url.rstrip("/").removesuffix("/api")

    def post(path: str, body: dict) -> list:
        request = urllib.request.Request(f"{base}/api{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)

    runs = post("/flow_runs/filter", {"flows": {"name": {"any_": [flow]}}, "sort": "START_TIME_DESC", "limit": 1})
    if not runs:
        print(f"no {flow} flow run on {base}: the Prefect picture is skipped")
        return None
    artifacts = post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [runs[0]["id"]]},
                                                         "type": {"any_": ["markdown"]}}, "limit": 10})
    if not artifacts:
        print(f"flow run {runs[0]['name']} has no Markdown artifact: the Prefect picture is skipped")
        return None
    return f"{base}/artifacts/artifact/{artifacts[0]['id']}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", default=os.environ.get("WAFER_FCN_HOME", "var"),
                        help="the wafer-fcn home holding mlflow.db (default $WAFER_FCN_HOME or ./var)")
    parser.add_argument("--out", default=str(REPO / "docs" / "img"), help="folder for the PNGs")
    parser.add_argument("--experiment", default="wafer-fcn")
    parser.add_argument("--model", default="wafer-fcn", help="registered model name")
    parser.add_argument("--prefect-url", help="a Prefect server on the demo's state, e.g. http://127.0.0.1:4200")
    # MLflow 3.17's UI opens its Assistant panel over the page on a first visit to localhost or
    # 127.0.0.1; another loopback address (Linux routes all of 127/8) shows the page alone
    parser.add_argument("--host", default="127.0.0.2", help="loopback address for the MLflow UI")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    parser.add_argument("--size", default="1400,1000", help="window size WIDTH,HEIGHT")
    parser.add_argument("--budget-ms", type=int, default=15000, help="virtual time each page gets to render")
    args = parser.parse_args(argv)

    db = Path(args.home).expanduser().resolve() / "mlflow.db"
    if not db.is_file():
        parser.error(f"no MLflow store at {db}: run `make demo` first or pass --home")
    if not shutil.which(args.chromium) and not Path(args.chromium).is_file():
        parser.error(f"{args.chromium} not found: install Debian's chromium or pass --chromium PATH")
    tracking_uri = f"sqlite:///{db}"
    out = Path(args.out)
    port = free_port(args.host)
    ui = f"http://{args.host}:{port}"
    with tempfile.TemporaryDirectory(prefix="wafer-fcn-shots-") as tmp:
        server = start_mlflow_ui(tracking_uri, args.host, port, Path(tmp) / "mlflow-ui.log")
        try:
            wait_http(f"{ui}/health")
            pages = mlflow_pages(tracking_uri, ui, experiment=args.experiment, model=args.model)
            for name, url in pages.items():
                screenshot(args.chromium, url, out / f"{name}.png", size=SIZES.get(name, args.size),
                           budget_ms=max(args.budget_ms, BUDGETS.get(name, 0)))
        finally:
            os.killpg(server.pid, 15)  # the UI and its workers (started in their own session)
            server.wait(timeout=30)
            errors = [line for line in (Path(tmp) / "mlflow-ui.log").read_text().splitlines()
                      if " ERROR " in line or "Traceback" in line]
            if errors:
                print("mlflow ui logged errors:\n" + "\n".join(errors[:20]))
    if args.prefect_url:
        page = prefect_artifact_page(args.prefect_url)
        if page:
            screenshot(args.chromium, page, out / "prefect_nightly_artifact.png", size=args.size,
                       budget_ms=args.budget_ms)
    return 0


if __name__ == "__main__":
    sys.exit(main())
