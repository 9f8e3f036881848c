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
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| block | mean IU") and out[-1].startswith("| 1 | 1.000 |")
