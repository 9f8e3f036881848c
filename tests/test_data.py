import threading
import time

import numpy as np
import pytest
import torch

from fcn_core.data import WaferSet, balanced_class_weights, class_frequencies, prefetch
from fcn_core.padding import IGNORE_INDEX
from fcn_core.synth import generate_wafers
from fcn_core.table import FAIL


@pytest.fixture(scope="module")
def wafers():
    return WaferSet.from_table(generate_wafers(60, seed=3))


def test_from_table_keeps_order_and_shapes(wafers):
    assert len(wafers) == 60 and wafers.labelled
    for die, label in zip(wafers.die, wafers.label):
        assert die.shape == label.shape


def test_batches_cover_every_wafer_once_in_uniform_shapes(wafers):
    seen = []
    for idx, batch in wafers.batches(batch_size=8, shuffle=True, seed=1):
        assert batch.x.shape[0] == len(idx) <= 8
        assert batch.x.shape[-2] % 32 == 0 and batch.x.shape[-1] % 32 == 0
        seen += idx
    assert sorted(seen) == list(range(len(wafers)))


def test_augmentation_keeps_labels_on_fail_dies(wafers):
    for idx, batch in wafers.batches(batch_size=8, shuffle=True, seed=2, augment=True):
        die = np.asarray(batch.die)
        target = batch.target.numpy()
        labelled = target != IGNORE_INDEX
        assert (die[labelled] == FAIL).all()          # targets only on fail dies
        assert (labelled == (die == FAIL)).all()      # ...and on every fail die
        # die counts per wafer are preserved by flips/rotations
        for row, i in enumerate(idx):
            assert (die[row] == FAIL).sum() == (wafers.die[i] == FAIL).sum()
            assert np.bincount(target[row][labelled[row]], minlength=5).tolist() == \
                np.bincount(wafers.label[i][wafers.die[i] == FAIL], minlength=5).tolist()


def test_class_weights_favour_rare_classes(wafers):
    counts = class_frequencies(wafers, 5)
    weights = balanced_class_weights(counts)
    present = counts > 0
    assert weights[present].mean() == pytest.approx(1.0, rel=1e-5)
    rarest, commonest = np.argmin(np.where(present, counts, np.inf)), np.argmax(counts)
    assert weights[rarest] > weights[commonest]


def test_missing_labels_are_reported(wafers):
    unlabelled = WaferSet(wafer_ids=["a"], die=[wafers.die[0]])
    with pytest.raises(ValueError, match="1 of 1 wafers have none"):
        unlabelled.require_labels("training")


def test_prefetch_keeps_order_and_applies_prepare(wafers):
    direct = [(idx, b.x.sum().item()) for idx, b in wafers.batches(batch_size=4, shuffle=True, seed=3, augment=True)]
    ahead = prefetch(wafers.batches(batch_size=4, shuffle=True, seed=3, augment=True), depth=2,
                     prepare=lambda item: (item[0], item[1].x.sum().item()))
    assert list(ahead) == direct


def test_prefetch_raises_the_producers_error():
    def items():
        yield 1
        raise RuntimeError("collation broke")

    got = []
    with pytest.raises(RuntimeError, match="collation broke"):
        for item in prefetch(items()):
            got.append(item)
    assert got == [1]


def test_prefetch_stops_its_thread_when_the_loop_ends_early():
    produced = []

    def endless():
        n = 0
        while True:
            produced.append(n)
            yield n
            n += 1

    def workers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "wafer-fcn-prefetch" and t.is_alive()]

    assert not workers()
    ahead = prefetch(endless(), depth=2)
    assert [next(ahead) for _ in range(3)] == [0, 1, 2]
    assert len(workers()) == 1
    ahead.close()  # what a `break` out of the training loop does
    deadline = time.monotonic() + 5
    while workers() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not workers()
    assert len(produced) <= 3 + 2 + 1  # never ran far ahead of the consumer


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pinned_batches_reach_the_gpu_unchanged(wafers):
    _, batch = next(wafers.batches(batch_size=4))
    pinned = batch.pin_memory()
    assert pinned.x.is_pinned() and pinned.target.is_pinned()
    on_gpu = pinned.to("cuda", non_blocking=True)
    assert torch.equal(on_gpu.x.cpu(), batch.x) and torch.equal(on_gpu.target.cpu(), batch.target)
