"""torchrun + DistributedDataParallel on CPU (gloo): 2 processes train like 1."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fcn_core.synth import generate_wafers
from fcn_core.table import write_parquet_atomic

TORCHRUN = Path(sys.executable).with_name("torchrun")
OVERRIDES = ["--set", "train.fcn32s.epochs=2", "--set", "train.fcn32s.lr=0.0002", "--set", "train.augment=false", "--set", "train.num_threads=1",
             "--set", "train.fcn32s.batch_size=8"]


def _results(stdout: str) -> list[dict]:
    return [json.loads(line)["result"] for line in stdout.splitlines() if line.startswith('{"result"')]


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed beside python")
def test_ddp_with_two_processes_matches_single_process(tmp_path):
    synth = {"size_max": 40, "wafers_per_lot": 2}
    from fcn_core.config import SynthConfig

    table = generate_wafers(40, seed=9, synth=SynthConfig(**synth))
    write_parquet_atomic(table.slice(0, 32), tmp_path / "train.parquet")
    write_parquet_atomic(table.slice(32), tmp_path / "val.parquet")
    common = ["--train", str(tmp_path / "train.parquet"), "--val", str(tmp_path / "val.parquet"),
              "--config", "tiny", "--stage", "fcn32s", *OVERRIDES]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "fcn_core.launch", "--out", str(tmp_path / "single"), *common],
                            capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "fcn_core.launch",
                          "--out", str(tmp_path / "ddp"), *common],
                         capture_output=True, text=True, env=env, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    (one,), (two,) = _results(single.stdout), _results(ddp.stdout)  # rank 0 alone prints
    assert (tmp_path / "ddp" / "fcn32s" / "best.pt").exists()
    losses_1 = [h["train_loss"] for h in one["history"]]
    losses_2 = [h["train_loss"] for h in two["history"]]
    assert len(losses_1) == len(losses_2) == 2
    # same wafers per step, gradients averaged over ranks: the same loss curve up to dropout noise
    # (a small learning rate keeps both runs in the same basin, so the curves are comparable)
    for a, b in zip(losses_1, losses_2):
        assert b == pytest.approx(a, rel=0.1)
