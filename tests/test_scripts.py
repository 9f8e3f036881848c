"""The analysis scripts under scripts/ (imported by path: scripts/ is not a package)."""

import importlib.util

import numpy as np

from fcn_core.config import REPO_ROOT
from fcn_core.table import FAIL, PASS


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_block_ceiling_counts_each_fail_die_against_its_block_majority():
    block_confusion = _script("block_ceiling").block_confusion
    die = np.full((4, 4), PASS, np.uint8)
    die[0, :3] = FAIL  # a 3-die scratch in the top-left 2x2 block and its neighbour
    die[1, 0] = FAIL
    label = np.zeros((4, 4), np.uint8)
    label[0, :3] = 2
    hist = block_confusion(die, label, 2, 5)
    assert hist[2, 2] == 3 and hist[0, 2] == 1 and hist.sum() == 4  # the background die is outvoted
    assert np.array_equal(np.diag(block_confusion(die, label, 1, 5)), [1, 0, 3, 0, 0])  # stride 1: exact


def test_block_ceiling_prints_the_table(capsys):
    _script("block_ceiling").main(["--n", "30", "--blocks", "2", "1"])
    out = [[c.strip() for c in line.strip().strip("|").split("|")] for line in capsys.readouterr().out.splitlines()]
    assert out[0][:2] == ["block", "mean IU (fail dies)"] and out[-1][:2] == ["1", "1.000"]


def test_real_verdicts_scores_a_run_with_and_without_the_shape_rule(tmp_path, capsys):
    import pyarrow as pa
    import pytest

    from fcn_core.checkpoint import model_state, save_checkpoint
    from fcn_core.config import load_config
    from fcn_core.models import build_fcn
    from fcn_core.synth import generate_wafers
    from fcn_core.table import write_parquet_atomic

    run = tmp_path / "run"
    script = _script("real_verdicts")
    with pytest.raises(SystemExit, match="no wm811k-val_scoring.parquet"):
        script.main([str(run)])
    cfg = load_config("tiny")
    model = build_fcn("fcn1s", n_classes=cfg.n_classes, preset=cfg.model.preset, geometry=cfg.model.geometry)
    save_checkpoint(run / "checkpoints" / "fcn1s" / "best.pt",
                    {"arch": dict(model.arch), "model": model_state(model), "config": cfg.to_dict()})
    as_dataset = {"none": "None", "scratch": "Scratch", "ring": "Edge-Ring", "local zone": "Loc", "circle": "Center"}
    for part, seed in (("wm811k-val_calibration", 1), ("wm811k-val_scoring", 2)):
        table = generate_wafers(24, seed=seed, synth=cfg.data.synth)
        labels = [as_dataset.get(x) for x in table.column("wafer_label").to_pylist()]  # mixes: unlabelled
        column = table.schema.get_field_index("wafer_label")
        table = table.set_column(column, "wafer_label", pa.array(labels, pa.string()))
        write_parquet_atomic(table, run / "data" / f"{part}.parquet")
    script.main([str(run), "--stages", "fcn8s,fcn1s"])
    out = capsys.readouterr().out
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| fcn1s")]
    assert "skipped fcn8s" in out
    assert [(r[1], r[2]) for r in rows] == [("scratch 4", "config"), ("scratch 4", "calibrated"),
                                            ("none", "config"), ("none", "calibrated")]
    assert all(0.0 <= float(r[3]) <= 1.0 and 0.0 <= float(r[4]) <= 1.0 for r in rows)
