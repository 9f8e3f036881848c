"""A night scored by a fixed model must not change, byte for byte, when the code is restructured.

``tests/data/golden_fcn8s.pt`` is a small trained FCN-8s (weights + arch, weights-only) and
``tests/data/golden_night.parquet`` a fixed synthetic night of 300 wafers; the hashes below were
recorded with the scoring code as it was before the Scorer/inference refactor (issue #14). A
change of any predicted die, count, verdict or column of the predictions table fails this test.

``GOLDEN`` was re-recorded when the ``patterns`` column (the multi-label verdict, issue #13) was
added to the predictions table. Every pre-existing column is unchanged: the table without
``patterns`` must still hash to ``GOLDEN_BEFORE_PATTERNS``, the hashes recorded before that column.

Dies follow patterns (``verdict.dies_follow_patterns``, issue #13) changes ``pred_map`` and the
``dies_*`` columns on purpose, so the hashes are checked with it off, and the table with it on
must be exactly that table with the absent patterns' dies made background.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fcn_core.config import VerdictConfig, load_config
from fcn_core.models import fcn_from_arch

DATA = Path(__file__).parent / "data"

# (bf16, verdict) -> sha256 of the predictions table, re-recorded when `patterns` was added
GOLDEN = {
    (False, "config"): "f8eb1c08d32e0523f41eb6ba7a5a7ccad16ab16b45d5e5cb80c65e40e2e6e681",
    (False, "calibrated"): "5e5638795c0e1bd89b74d05d79d7c01119e7a08815dad0966e8c6935772744ff",
    (True, "config"): "800aa38df39c2a1755c79f2c9a6405ac542abedf2c09e86b869c3c1ac5d30881",
}
# (bf16, verdict) -> sha256 of the predictions table without `patterns`: the hashes recorded before
# the refactor (issue #14) and before that column, never to be re-recorded
GOLDEN_BEFORE_PATTERNS = {
    (False, "config"): "80e8f974d240d104039a666fb0467cb78397803f2855fb5119ed041088677d4c",
    (False, "calibrated"): "694c90bfde4f0ca2681db3065d70e476f8555a80bc2a5b2567f70f10f36bcbee",
    (True, "config"): "d2465b8dd55f6cde62841646d625d36d0f09c863de6b2ee323006cac9d73f0c8",
}

CALIBRATED = VerdictConfig(min_dies=5, min_share=0.1, min_dies_by_class={"scratch": 3},
                           min_share_by_class={"circle": 0.2}, min_elongation_by_class={"scratch": 4.0},
                           calibrated_on="golden")


def table_digest(table: pa.Table) -> str:
    h = hashlib.sha256()
    for name in table.column_names:
        h.update(name.encode())
        h.update(str(table.column(name).type).encode())
        h.update(repr(table.column(name).to_pylist()).encode())
    return h.hexdigest()


def golden_model() -> torch.nn.Module:
    saved = torch.load(DATA / "golden_fcn8s.pt", weights_only=True)
    model = fcn_from_arch(saved["arch"])
    model.load_state_dict(saved["state_dict"])
    return model.eval()


def score(bf16: bool, verdict_name: str, *, follow: bool = False) -> pa.Table:
    cfg = load_config("tiny")
    night = pq.read_table(DATA / "golden_night.parquet")
    verdict = (cfg.verdict if verdict_name == "config" else CALIBRATED).model_copy(
        update={"dies_follow_patterns": follow})
    from fcn_core.scorer import Scorer

    return Scorer(golden_model(), verdict, cfg).score_table(night, model_name="golden", model_version="1", bf16=bf16)


@pytest.mark.parametrize("bf16,verdict_name", list(GOLDEN))
def test_night_scores_byte_identical(bf16, verdict_name):
    out = score(bf16, verdict_name)
    labels = np.frombuffer(b"".join(out.column("pred_map").to_pylist()), np.uint8)
    assert len(np.unique(labels)) >= 3, "the golden model must paint several patterns to be a real check"
    assert table_digest(out.drop_columns(["patterns"])) == GOLDEN_BEFORE_PATTERNS[(bf16, verdict_name)]
    assert table_digest(out) == GOLDEN[(bf16, verdict_name)]


@pytest.mark.parametrize("verdict_name", ["config", "calibrated"])
def test_following_patterns_only_clears_the_dies_of_absent_patterns(verdict_name):
    before, after = score(False, verdict_name), score(False, verdict_name, follow=True)
    names = load_config("tiny").class_names
    dies_columns = [f"dies_{n.replace(' ', '_')}" for n in names[1:]]
    same = [c for c in before.column_names if c not in {"pred_map", *dies_columns}]
    assert after.select(same).equals(before.select(same))  # verdicts, yield, ids: unchanged
    cleared = 0
    for i, patterns in enumerate(before.column("patterns").to_pylist()):
        present = {0} | {k for k, n in enumerate(names) if k and n in patterns.split("+")}
        old = np.frombuffer(before.column("pred_map")[i].as_py(), np.uint8)
        new = np.frombuffer(after.column("pred_map")[i].as_py(), np.uint8)
        assert np.array_equal(new, np.where(np.isin(old, sorted(present)), old, 0))
        cleared += int((new != old).sum())
        for k, column in enumerate(dies_columns, start=1):
            want = before.column(column)[i].as_py() if k in present else 0
            assert after.column(column)[i].as_py() == want
    assert cleared > 0  # the golden night has dies of patterns too small to count

