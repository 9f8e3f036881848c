"""The wafer-fcn CLI: exit codes, files written, messages (typer's CliRunner, in process)."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from flows import cli
from flows.cli import app
from fcn_core.table import WAFER_SCHEMA, make_table
from fcn_core.validate import validate_table

runner = CliRunner()


def wafers(ids, *, bad_ids=()) -> pa.Table:
    die = np.array([[0, 1, 1, 0], [1, 2, 2, 1], [1, 1, 2, 1], [0, 1, 1, 0]], np.uint8)
    label = np.where(die == 2, 2, 0).astype(np.uint8)
    table = make_table(wafer_ids=list(ids), die_maps=[die] * len(ids), label_maps=[label] * len(ids))
    if bad_ids:
        heights = [0 if i in bad_ids else 4 for i in ids]
        table = table.set_column(3, WAFER_SCHEMA.field("height"), pa.array(heights, pa.int32()))
    return table


def write(table: pa.Table, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_clean_error(result, *, contains: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and contains in lines[0], result.stderr


@pytest.mark.parametrize("command", [[], ["synth"], ["validate"], ["ingest"], ["show"]])
def test_help(command):
    result = run(*command, "--help")
    assert result.exit_code == 0 and "Usage" in result.output and "--config" in result.output


def test_validate_writes_valid_and_quarantine(tmp_path):
    src = write(wafers(["a", "b", "c", "d"], bad_ids={"c"}), tmp_path / "in.parquet")
    result = run("validate", src, "--out-dir", tmp_path / "out")
    assert result.exit_code == 0, result.output
    valid = pq.read_table(tmp_path / "out/valid.parquet")
    quarantine = pq.read_table(tmp_path / "out/quarantine.parquet")
    assert valid.column("wafer_id").to_pylist() == ["a", "b", "d"]
    assert quarantine.column("reason").to_pylist() == ["size_out_of_range"]
    assert quarantine.column("height").to_pylist() == [0]  # as it came
    assert "size_out_of_range" in result.stdout and "quarantined 1" in result.stdout
    assert "valid 3" in result.stdout


def test_validate_all_good_still_writes_empty_quarantine(tmp_path):
    src = write(wafers(["a"]), tmp_path / "in.parquet")
    assert run("validate", src, "-o", tmp_path / "out").exit_code == 0
    assert pq.read_table(tmp_path / "out/quarantine.parquet").num_rows == 0


@pytest.mark.parametrize("content,message", [
    (None, "no such file"),
    (b"definitely not parquet", "not a readable Parquet file"),
    ("no-columns", "missing required column"),
])
def test_validate_unreadable_input_fails_cleanly(tmp_path, content, message):
    src = tmp_path / "in.parquet"
    if isinstance(content, bytes):
        src.write_bytes(content)
    elif content == "no-columns":
        write(pa.table({"x": [1, 2]}), src)
    result = run("validate", src, "--out-dir", tmp_path / "out")
    assert_clean_error(result, contains=message)
    assert not (tmp_path / "out").exists()


def test_config_errors_are_one_line(tmp_path):
    src = write(wafers(["a"]), tmp_path / "in.parquet")
    assert_clean_error(run("-c", "no-such-config", "validate", src, "-o", tmp_path / "o"), contains="not found")
    assert_clean_error(run("validate", src, "-o", tmp_path / "o", "--set", "data.pad_multiple=0"),
                       contains="data.pad_multiple")
    assert_clean_error(run("--set", "oops", "validate", src, "-o", tmp_path / "o"), contains="key.path=value")


def test_class_count_comes_from_config(tmp_path):
    """Label 2 is valid with the default 5 classes but not when the config only has 2."""
    src = write(wafers(["a"]), tmp_path / "in.parquet")
    two = tmp_path / "two.yaml"
    two.write_text("classes:\n- {id: 0, name: background, color: '#dddddd'}\n- {id: 1, name: ring, color: blue}\n")
    assert "quarantined 0" in run("validate", src, "-o", tmp_path / "o1").stdout
    result = run("-c", two, "validate", src, "-o", tmp_path / "o2")
    assert result.exit_code == 0 and "label_map_values" in result.stdout and "quarantined 1" in result.stdout


def test_ingest_twice_and_default_store_under_home(tmp_path):
    src = write(wafers(["a", "b", "c"], bad_ids={"b"}), tmp_path / "drops/n1.parquet")
    home = tmp_path / "home"
    first = run("--set", f"home={home}", "ingest", tmp_path / "drops")
    assert first.exit_code == 0, first.output
    assert "rows valid" in first.stdout and "size_out_of_range" in first.stdout
    parts = list((home / "curated").glob("date=*/part-*.parquet"))
    assert len(parts) == 1 and pq.read_table(parts[0]).num_rows == 2
    second = run("ingest", src, "--curated", home / "curated")
    assert second.exit_code == 0
    assert re.search(r"files skipped \(already ingested\)\W+1\W", second.stdout), second.stdout
    assert re.search(r"files ingested\W+0\W", second.stdout)
    assert list((home / "curated").glob("date=*/part-*.parquet")) == parts


def test_ingest_exit_codes_for_bad_sources(tmp_path):
    good = write(wafers(["a"]), tmp_path / "drops/a.parquet")
    assert_clean_error(run("ingest", good, tmp_path / "missing", "--curated", tmp_path / "cur"),
                       contains="no such file")
    (tmp_path / "drops/b.parquet").write_bytes(b"garbage")
    result = run("ingest", tmp_path / "drops", "--curated", tmp_path / "cur")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "b.parquet" in result.stderr and "could not be read" in result.stderr
    assert len(list((tmp_path / "cur").glob("date=*/part-*.parquet"))) == 1  # the good file went in


def test_show_writes_png(tmp_path):
    src = write(wafers(["a", "b", "c", "d"], bad_ids={"d"}), tmp_path / "in.parquet")
    result = run("show", src, "--out", tmp_path / "w.png", "--n", 2)
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "w.png") as im:
        assert im.format == "PNG" and 300 < im.size[0] < 1000 and 400 < im.size[1] < 1000  # 2 wafers x 2 panels
    ids = run("show", src, "-o", tmp_path / "ids.png", "--ids", "c, a", "--ncols", 2)
    assert ids.exit_code == 0 and (tmp_path / "ids.png").stat().st_size > 1000
    assert "2 wafers" in ids.stdout


def test_show_with_predictions(tmp_path):
    table = wafers(["a", "b"])
    src = write(table, tmp_path / "in.parquet")
    pred = np.zeros(16, np.uint8)
    preds = write(pa.table({"wafer_id": ["b"], "pred_map": pa.array([pred.tobytes()], pa.binary())}),
                  tmp_path / "pred.parquet")
    result = run("show", src, "-o", tmp_path / "p.png", "--predictions", preds)
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "p.png") as im:
        assert im.size[0] > 650  # three panels: die | truth | prediction


def test_show_unknown_or_quarantined_ids(tmp_path):
    src = write(wafers(["a", "bad"], bad_ids={"bad"}), tmp_path / "in.parquet")
    assert_clean_error(run("show", src, "-o", tmp_path / "x.png", "--ids", "zzz"), contains="'zzz' is not in")
    assert_clean_error(run("show", src, "-o", tmp_path / "x.png", "--ids", "bad"), contains="size_out_of_range")
    assert not (tmp_path / "x.png").exists()


def test_synth_streams_chunks_atomically(tmp_path, monkeypatch):
    """The CLI plumbing (chunks, progress, atomic file) against a stand-in generator."""
    def generate_wafers(n, *, seed, synth=None, start_index=0, classes=None):
        return wafers([f"s{seed}-{start_index + i}" for i in range(n)])

    def iter_wafer_chunks(n, chunk_size, *, seed, synth=None, classes=None):
        for start in range(0, n, chunk_size):
            yield generate_wafers(min(chunk_size, n - start), seed=seed, start_index=start)

    fake = types.ModuleType("fcn_core.synth")
    fake.generate_wafers, fake.iter_wafer_chunks = generate_wafers, iter_wafer_chunks
    monkeypatch.setitem(sys.modules, "fcn_core.synth", fake)
    monkeypatch.setattr("fcn_core.synth", fake, raising=False)
    monkeypatch.setattr(cli, "SYNTH_CHUNK", 4)
    result = run("synth", tmp_path / "s/out.parquet", "--n", 10, "--seed", 3)
    assert result.exit_code == 0, result.output
    table = pq.read_table(tmp_path / "s/out.parquet")
    assert table.column("wafer_id").to_pylist() == [f"s3-{i}" for i in range(10)]
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["out.parquet"]  # no temporary left
    small = run("synth", tmp_path / "small.parquet", "--n", 3)
    assert small.exit_code == 0 and pq.read_table(tmp_path / "small.parquet").num_rows == 3


def test_synth_with_the_real_generator_validates(tmp_path):
    pytest.importorskip("fcn_core.synth")
    out = tmp_path / "synth.parquet"
    result = run("-c", "tiny", "synth", out, "--n", 40, "--seed", 5)
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    assert table.num_rows == 40
    checked = validate_table(table, n_classes=5)
    assert checked.counts == {} and checked.valid.column("label_map").null_count == 0
    again = tmp_path / "again.parquet"
    assert run("synth", again, "--n", 40, "--seed", 5, "-c", "tiny").exit_code == 0
    assert pq.read_table(again).equals(table)  # same seed, same wafers
    # the stable scripted pipeline: synth -> validate -> ingest -> show
    assert run("validate", out, "--out-dir", tmp_path / "v").exit_code == 0
    assert run("ingest", out, "--curated", tmp_path / "cur").exit_code == 0
    assert run("show", out, "--out", tmp_path / "s.png", "--n", 3).exit_code == 0


def test_ingest_converts_other_formats_and_refuses_untrusted_pickles(tmp_path, monkeypatch):
    import numpy as np
    import pandas as pd
    from typer.testing import CliRunner

    from fcn_core.ingest import read_curated
    from flows.cli import app

    monkeypatch.setenv("WAFER_FCN_HOME", str(tmp_path / "home"))
    maps = np.ones((3, 52, 52), np.int64)
    maps[:, 0, :] = 0
    maps[:, 10, 10] = 2
    labels = np.zeros((3, 8), np.int64)
    labels[0, 0] = 1
    np.savez(tmp_path / "mixed.npz", arr_0=maps, arr_1=labels)
    runner = CliRunner()
    result = runner.invoke(app, ["ingest", str(tmp_path / "mixed.npz"), "--curated", str(tmp_path / "cur")])
    assert result.exit_code == 0, result.output
    assert read_curated(str(tmp_path / "cur")).num_rows == 3

    frame = pd.DataFrame({"waferMap": [np.ones((4, 4), np.uint8)], "dieSize": [16.0], "lotName": ["lot1"],
                          "waferIndex": [1.0], "trianTestLabel": [[]], "failureType": [[]]})
    frame.to_pickle(tmp_path / "LSWMD.pkl")
    refused = runner.invoke(app, ["ingest", str(tmp_path / "LSWMD.pkl"), "--curated", str(tmp_path / "cur2")])
    assert refused.exit_code == 1 and "trust" in refused.output
    trusted = runner.invoke(app, ["ingest", str(tmp_path / "LSWMD.pkl"), "--trust", "--curated", str(tmp_path / "cur2")])
    assert trusted.exit_code == 0, trusted.output


# -- outputs: never the input, never a folder, no temporary file left (issue 16.5) -------------------
def _same_bytes_after(path: Path, before: bytes) -> bool:
    return path.read_bytes() == before


@pytest.mark.parametrize("how", ["same path", "symlink", "hard link", "relative"])
def test_predict_refuses_to_overwrite_its_input(tmp_path, monkeypatch, how):
    src = write(wafers(["a", "b"]), tmp_path / "in.parquet")
    before = src.read_bytes()
    dest = {"same path": src, "symlink": tmp_path / "link.parquet", "hard link": tmp_path / "hard.parquet",
            "relative": Path("sub/../in.parquet")}[how]
    if how == "symlink":
        dest.symlink_to(src)
    elif how == "hard link":
        dest.hardlink_to(src)
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    result = run("predict", src, dest)
    assert_clean_error(result, contains="is the input file")
    assert _same_bytes_after(src, before) and not list(tmp_path.glob(".*tmp-*"))


def test_predict_refuses_an_output_inside_an_input_folder(tmp_path):
    write(wafers(["a"]), tmp_path / "drops" / "a.parquet")
    result = run("predict", tmp_path / "drops", tmp_path / "drops" / "preds.parquet")
    assert_clean_error(result, contains="inside the input folder")
    assert [p.name for p in (tmp_path / "drops").iterdir()] == ["a.parquet"]


@pytest.mark.parametrize("command", ["predict", "synth"])
def test_an_output_folder_is_one_line_and_leaves_no_temporary_file(tmp_path, command):
    src = write(wafers(["a"]), tmp_path / "in.parquet")
    (tmp_path / "out").mkdir()
    args = ("predict", src, tmp_path / "out") if command == "predict" else ("synth", tmp_path / "out", "--n", 2)
    assert_clean_error(run(*args), contains="is a folder")
    assert list((tmp_path / "out").iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet", "out"]


def test_validate_refuses_to_overwrite_its_input(tmp_path):
    src = write(wafers(["a", "bad"], bad_ids={"bad"}), tmp_path / "v" / "valid.parquet")
    before = src.read_bytes()
    assert_clean_error(run("validate", src, "--out-dir", tmp_path / "v"), contains="is the input file")
    assert _same_bytes_after(src, before)


_SLOW_SYNTH = """
import sys, time, types
import numpy as np
from fcn_core.table import make_table
def generate_wafers(n, *, seed, synth=None, start_index=0, classes=None):
    rng = np.random.default_rng(start_index)
    return make_table(wafer_ids=[f"w{start_index + i}" for i in range(n)],
                      die_maps=[rng.integers(0, 3, (64, 64), dtype=np.uint8) for _ in range(n)])
def iter_wafer_chunks(n, chunk_size, *, seed, synth=None, classes=None):
    for start in range(0, n, chunk_size):
        yield generate_wafers(min(chunk_size, n - start), seed=seed, start_index=start)
        time.sleep(float(sys.argv[1]))
fake = types.ModuleType("fcn_core.synth")
fake.generate_wafers, fake.iter_wafer_chunks = generate_wafers, iter_wafer_chunks
sys.modules["fcn_core.synth"] = fake
import fcn_core; fcn_core.synth = fake
from flows import cli
cli.SYNTH_CHUNK = 500
cli.app(sys.argv[2:])
"""


def test_kill_9_mid_write_leaves_temps_that_the_next_run_cleans(tmp_path):
    """A writer killed with -9 leaves its temporary file; the next run removes it and writes the
    same table as an uninterrupted run (the old output stays intact meanwhile)."""
    import os
    import signal
    import subprocess
    import time

    env = {**os.environ, "PYTHONPATH": str(Path(cli.__file__).resolve().parents[1])}
    out = tmp_path / "out" / "big.parquet"

    def synth(n: int, pause: float, dest: Path) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", _SLOW_SYNTH, str(pause), "synth", str(dest), "--n", str(n)],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    first = synth(2_000, 0.0, out)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    old = out.read_bytes()
    writer = synth(1_000_000, 0.2, out)  # would take minutes: killed while its file is half written
    deadline = time.monotonic() + 300
    while not [p for p in out.parent.glob(".big.parquet.tmp-*") if p.stat().st_size > 0]:
        assert writer.poll() is None and time.monotonic() < deadline, writer.stderr.read()
        time.sleep(0.1)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait(timeout=60)
    assert list(out.parent.glob(".big.parquet.tmp-*")), "the killed writer should have left its temporary file"
    assert out.read_bytes() == old  # readers never saw half a file

    rerun = synth(3_000, 0.0, out)
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read()
    reference = synth(3_000, 0.0, tmp_path / "ref" / "big.parquet")
    assert reference.wait(timeout=300) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["big.parquet"]
    assert pq.read_table(out).equals(pq.read_table(tmp_path / "ref" / "big.parquet"))


def test_predict_cleans_temporary_files_of_killed_runs_beside_its_output(tmp_path, wafer_home):
    import subprocess

    dead_pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                                  capture_output=True, text=True).stdout)
    src = write(wafers(["a"]), tmp_path / "in.parquet")
    stale = tmp_path / "out" / f".preds.parquet.tmp-{dead_pid}-0a1b2c3d"
    stale.parent.mkdir()
    stale.write_bytes(b"half")
    result = run("predict", src, tmp_path / "out" / "preds.parquet", "--model", tmp_path / "no-such-model.pt")
    assert result.exit_code == 1 and "Traceback" not in result.output  # no model: a clean error, after cleaning
    assert list((tmp_path / "out").iterdir()) == []


def test_predict_scores_valid_rows_with_a_scorer_file(tmp_path):
    """`wafer-fcn predict --model scorer.pt`: the scorer's own calibrated rules, the same table as Scorer.score_table."""
    import torch

    from fcn_core.config import VerdictConfig, load_config
    from fcn_core.models import build_fcn
    from fcn_core.scorer import Scorer, save_scorer

    cfg = load_config("tiny", {"home": str(tmp_path / "home")})
    torch.manual_seed(0)
    scorer = Scorer(build_fcn("fcn8s", n_classes=cfg.n_classes), VerdictConfig(min_dies=1, calibrated_on="x"), cfg)
    bundle = save_scorer(scorer, tmp_path / "scorer.pt")
    src = write(wafers(["a", "b", "c"], bad_ids=("b",)), tmp_path / "in.parquet")
    result = run("predict", src, tmp_path / "out.parquet", "--model", bundle, "-c", "tiny",
                 "--set", f"home={tmp_path / 'home'}", "--threads", 1, "--device", "cpu")
    assert result.exit_code == 0, result.output
    out = pq.read_table(tmp_path / "out.parquet")
    assert out.column("wafer_id").to_pylist() == ["a", "c"] and "1 invalid" in result.output
    valid = validate_table(pq.read_table(src), n_classes=cfg.n_classes).valid
    want = scorer.score_table(valid, model_name=str(bundle), model_version="local", num_threads=1)
    assert out.select(want.column_names).equals(want)
