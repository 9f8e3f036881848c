"""Every bench script runs end to end with tiny sizes and writes valid JSON (no timing asserts)."""

import importlib
import json
import math

import pytest
import torch

from fcn_core.config import REPO_ROOT


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    threads = torch.get_num_threads()
    yield lambda name: importlib.import_module(f"bench.{name}")
    torch.set_num_threads(threads)


def _load(path):
    data = json.loads(path.read_text())
    machine = data["machine"]
    assert machine["cpu_model"] and machine["cpu_cores"] >= 1 and machine["torch"] == torch.__version__
    assert machine["date"][:2] == "20"
    return data


def test_inference_bench(bench, tmp_path):
    bench("inference").main([
        "--results-dir", str(tmp_path), "--threads", "1", "--repeats", "1", "--lever-threads", "1",
        "--e2e-threads", "1", "--n64", "6", "--real-limit", "24", "--cell-seconds", "0.05", "--presets", "compact",
        "--peer-batch", "3", "--n-test", "6", "--budget", "12,4,1", "--cache-dir", str(tmp_path / "cache"),
        "--sections", "levers,grid,e2e,accuracy,peer,gpu",  # not "compile": inductor takes tens of seconds
    ])
    data = _load(tmp_path / "inference.json")
    assert data["roofline"]["fp32_gflops"] > 0
    assert {(r["preset"], r["geometry"], r["dtype"]) for r in data["grid"]} == {
        (p, g, d) for p in ("compact",) for g in ("aligned", "classic") for d in ("fp32", "bf16")}
    assert all(r["per_s"] > 0 and r["peak_rss_mib"] > 0 for r in data["grid"])
    e2e = data["end_to_end"]
    assert {r["dtype"] for r in e2e} == {"fp32", "bf16"} and all(r["wafers"] > 0 for r in e2e)
    assert data["peer"][0]["speed_ratio_vs_peer"] > 0
    synthetic = data["accuracy"]["synthetic test split"]
    assert 0.0 <= synthetic["fail_die_agreement_bf16_vs_fp32"] <= 1.0
    assert synthetic["fail_die_agreement_fp32_vs_baseline"] > 0.99  # same fp32 maths, new code path
    if not torch.cuda.is_available():
        assert data["gpu"].startswith("not measured")
    if data["real_data"] != "absent":
        assert any(r["lever"].startswith("baseline") for r in data["levers"])


def test_training_bench(bench, tmp_path):
    bench("training").main([
        "--results-dir", str(tmp_path), "--threads", "1", "--repeats", "1", "--lever-threads", "1",
        "--wafers", "12", "--batch", "4", "--lever-batches", "1", "--big-steps", "1", "--vgg-batch", "1",
        "--sections", "train_stage,levers,gpu", "--gpu-wafers", "16",
    ])
    data = _load(tmp_path / "training.json")
    if torch.cuda.is_available():  # the GPU machine: every CUDA run trained and measured
        runs = data["gpu"]["train_stage"]
        assert len(runs) == 12 and all(r["wafers_per_s"] > 0 and r["cuda_max_allocated_mib"] > 0 for r in runs)
    else:
        assert data["gpu"].startswith("not measured")
    stages = ["fcn32s", "fcn16s", "fcn8s", "fcn4s", "fcn2s", "fcn1s"]
    assert [r["stage"] for r in data["train_stage"]] == stages
    assert all(r["wafers_per_s"] > 0 for r in data["train_stage"])
    assert len(data["step_levers"]) == len(stages) * 4 and all(math.isfinite(r["per_s"]) for r in data["step_levers"])


def test_cascade_bench_trains_and_scores_every_stage(bench, tmp_path):
    bench("cascade").main(["--results-dir", str(tmp_path), "--threads", "1", "--config", "tiny", "--device", "cpu",
                           "--set", "train.final_stage=fcn8s", "--tag", "smoke", "--out", str(tmp_path / "run")])
    data = _load(tmp_path / "cascade-smoke.json")
    assert (tmp_path / "run" / "checkpoints" / "fcn8s" / "best.pt").exists()  # kept, in a flow run's layout
    rows = {r["stage"]: r for r in data["stages"]}
    assert list(rows)[:3] == ["fcn32s", "fcn16s", "fcn8s"] and len(rows) == 4  # + the wall-time row
    for stage in ("fcn32s", "fcn16s", "fcn8s"):
        assert rows[stage]["epochs"] == 1 and rows[stage]["wafers_per_s"] > 0
        assert 0.0 <= rows[stage]["test_mean_iu"] <= 1.0
    assert data["device"] == "cpu" and "train.final_stage=fcn8s" in data["overrides"]


def test_memory_bench(bench, tmp_path):
    data = bench("memory").main(["--results-dir", str(tmp_path), "--threads", "1", "--n", "50", "--chunk", "20"])
    saved = _load(tmp_path / "memory.json")
    assert saved["wafers_scored"] == data["wafers_scored"] == 50
    assert saved["peak_rss_mib"] > 0 and saved["under_limit"] is True
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in bench("report").render(tmp_path).splitlines() if line.startswith("|")]
    assert ["50", "20"] in [r[:2] for r in rows]  # the docs' table helper reads it back


def test_geometry_bench(bench, tmp_path):
    bench("geometry").main(["--results-dir", str(tmp_path), "--threads", "1", "--repeats", "1", "--n64", "2",
                            "--real-sample", "4", "--skip-training"])
    data = _load(tmp_path / "geometry.json")
    assert [r["geometry"] for r in data["speed"]] == ["aligned", "classic"]
    assert data["aligned_over_classic_speed"]["synthetic 64x64"] > 0


def test_run_all_rejects_unknown_scripts(bench):
    with pytest.raises(SystemExit):
        bench("run_all").main(["--only", "nonsense"])


def test_synth_ceiling_bench(bench, tmp_path):
    bench("synth_ceiling").main(["--results-dir", str(tmp_path), "--n", "30"])
    data = _load(tmp_path / "synth-ceiling.json")
    assert [r["generator"] for r in data["results"]] == ["default", "broad"]
    for result in data["results"]:  # every wafer's draws rebuilt its maps, else main() raised
        assert result["checks"]["wafers_verified"] == 60 and result["checks"]["fail_dies_verified"] > 0
        assert all(0.0 < row["mean_iu"] <= 1.0 for row in result["rows"])
    assert "| broad |" in (tmp_path / "synth-ceiling.md").read_text()


def test_synth_ceiling_stops_on_a_draw_it_did_not_record(bench, monkeypatch):
    from fcn_core import synth
    from fcn_core.config import load_config

    ceiling, plain = bench("synth_ceiling"), synth._circle
    # a generator change: circles also fail 5 % of dies at random, outside _fire
    monkeypatch.setattr(synth, "_circle", lambda rng, g, **kw: plain(rng, g, **kw) | (rng.random(g.sites.size) < 0.05))
    cfg = load_config("default")
    with pytest.raises(ceiling.ReconstructionError, match="circle pattern's mask"):
        ceiling.oracle_data(60, seed=0, synth_cfg=cfg.data.synth, cfg=cfg)
