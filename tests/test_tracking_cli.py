"""``wafer-fcn predict`` and the registry: weights-only loading, one-line refusals, no store side effects."""

from __future__ import annotations

import pickle
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from typer.testing import CliRunner

from fcn_core.config import VerdictConfig, load_config
from fcn_core.models import build_fcn
from fcn_core.scorer import Scorer, save_scorer
from fcn_core.table import make_table
from flows.cli import app
from tracking import registry, runs, store

runner = CliRunner()
CALIBRATED = VerdictConfig(min_dies=50, min_share=0.9, calibrated_on="real.parquet")  # nothing passes these


class RunsCode:
    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


def wafers(path: Path, n: int = 4) -> Path:
    die = np.array([[0, 1, 1, 0], [1, 2, 2, 1], [1, 1, 2, 1], [0, 1, 1, 0]], np.uint8)
    pq.write_table(make_table(wafer_ids=[f"w{i}" for i in range(n)], die_maps=[die] * n,
                              label_maps=[np.where(die == 2, 2, 0).astype(np.uint8)] * n), path)
    return path


def assert_one_line_error(result, *, contains: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and contains in lines[0], result.stderr


@pytest.fixture(scope="module")
def champion_home(tmp_path_factory):
    """A home whose store holds a champion judged by calibrated verdict rules."""
    home = tmp_path_factory.mktemp("home")
    cfg = load_config("tiny", {"home": str(home)})
    torch.manual_seed(0)
    model = build_fcn("fcn8s", n_classes=cfg.n_classes, preset="compact").eval()
    bundle = save_scorer(Scorer(model=model, verdict=CALIBRATED, cfg=cfg), home / "scorer.pt")
    client = store.open_store(cfg)
    run_id = runs.start_parent_run(client, cfg, data_fingerprint="cli")
    registry.register_model(cfg, client=client, run_id=run_id, scorer_path=bundle, candidate_score=0.5,
                            rescore=lambda s: 0.0)
    runs.end_run(client, run_id)
    return home


def test_predict_scores_with_the_champion_and_its_verdict_rules(champion_home, tmp_path, monkeypatch):
    monkeypatch.setenv("WAFER_FCN_HOME", str(champion_home))
    out = tmp_path / "p.parquet"
    result = runner.invoke(app, ["-c", "tiny", "predict", str(wafers(tmp_path / "in.parquet")), str(out)])
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    assert table.column("model_name").to_pylist() == ["wafer-fcn"] * 4
    assert table.column("model_version").to_pylist() == ["1"] * 4
    # the calibrated rules (min_dies 50) travel with the model: no wafer gets a pattern verdict
    assert set(table.column("dominant_pattern").to_pylist()) == {"none"}


@pytest.mark.parametrize("bad,contains", [("/etc/passwd", "not a weights-only"),
                                          ("/no/such/model.pt", "no such file or folder"),
                                          ("models:/wafer-fcn/9", "no version 9")])
def test_predict_refuses_a_bad_model_with_one_line(champion_home, tmp_path, monkeypatch, bad, contains):
    monkeypatch.setenv("WAFER_FCN_HOME", str(champion_home))
    result = runner.invoke(app, ["-c", "tiny", "predict", str(wafers(tmp_path / "in.parquet")),
                                 str(tmp_path / "p.parquet"), "--model", bad])
    assert_one_line_error(result, contains=contains)
    assert "index out of range" not in result.stderr and not (tmp_path / "p.parquet").exists()


def test_predict_never_runs_a_pickled_model(tmp_path, monkeypatch, champion_home):
    """The folder of issue #16.3: an MLmodel file beside a data/model.pth whose __reduce__ runs code."""
    monkeypatch.setenv("WAFER_FCN_HOME", str(champion_home))
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil-model"
    (evil / "data").mkdir(parents=True)
    (evil / "MLmodel").write_text(yaml.safe_dump({"flavors": {"pytorch": {"model_data": "data"}}}))
    code = f"import pathlib; pathlib.Path({str(marker)!r}).write_text('pwned')"
    (evil / "data" / "model.pth").write_bytes(pickle.dumps(RunsCode(code)))
    for model in (evil, evil / "data" / "model.pth"):
        result = runner.invoke(app, ["-c", "tiny", "predict", str(wafers(tmp_path / "in.parquet")),
                                     str(tmp_path / "p.parquet"), "--model", str(model)])
        assert_one_line_error(result, contains="not a weights-only")
    assert not marker.exists()
    pickle.loads((evil / "data" / "model.pth").read_bytes())  # the control: plain unpickling runs it
    assert marker.read_text() == "pwned"


def test_predict_on_a_missing_store_creates_nothing(tmp_path, monkeypatch):
    home = tmp_path / "empty-home"
    monkeypatch.setenv("WAFER_FCN_HOME", str(home))
    result = runner.invoke(app, ["-c", "tiny", "predict", str(wafers(tmp_path / "in.parquet")),
                                 str(tmp_path / "p.parquet")])
    assert_one_line_error(result, contains="train a model first")
    assert not (home / "mlflow.db").exists() and not (home / "mlartifacts").exists()


def test_predict_on_a_locked_store_retries_then_one_line(champion_home, tmp_path, monkeypatch):
    monkeypatch.setenv("WAFER_FCN_HOME", str(champion_home))
    monkeypatch.setattr(store, "LOCK_RETRY_DELAYS", (0.05, 0.1))
    holder = sqlite3.connect(champion_home / "mlflow.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        result = runner.invoke(app, ["-c", "tiny", "predict", str(wafers(tmp_path / "in.parquet")),
                                     str(tmp_path / "p.parquet")])
    finally:
        holder.execute("COMMIT")
        holder.close()
    assert_one_line_error(result, contains="locked by another process")


def test_predict_imports_neither_mlflow_nor_prefect(champion_home, tmp_path):
    script = ("import sys\nfrom flows.cli import app\n"
              f"try:\n    app(['-c', 'tiny', 'predict', {str(wafers(tmp_path / 'in.parquet'))!r}, "
              f"{str(tmp_path / 'p.parquet')!r}])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
              "heavy = sorted(m for m in ('mlflow', 'prefect', 'matplotlib') if m in sys.modules)\n"
              "print('heavy:', heavy)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).parents[1]),
                              "WAFER_FCN_HOME": str(champion_home)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "heavy: []"
