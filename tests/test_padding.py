import numpy as np
import pytest
import torch

from fcn_core.padding import (
    IGNORE_INDEX,
    Batch,
    collate,
    crop_map,
    one_hot_dies,
    pad_map,
    padded_shape,
    size_buckets,
    train_targets,
)

ODD_SIZES = [(1, 1), (26, 26), (56, 53), (212, 204), (1024, 1024)]


def random_dies(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 3, size=(h, w), dtype=np.uint8)


def test_padded_shape_rounds_each_side_up() -> None:
    assert padded_shape(56, 53) == (64, 64)  # the seed deck's example
    assert padded_shape(1, 1) == (32, 32)
    assert padded_shape(32, 33) == (32, 64)
    assert padded_shape(212, 204) == (224, 224)
    assert padded_shape(26, 26, multiple=8) == (32, 32)
    assert padded_shape(26, 27, multiple=1) == (26, 27)


def test_padded_shape_fixed_and_errors() -> None:
    assert padded_shape(56, 53, fixed=96) == (96, 96)
    assert padded_shape(96, 3, fixed=96) == (96, 96)
    with pytest.raises(ValueError, match="fixed pad size 64 is smaller than a 65 x 3 map"):
        padded_shape(65, 3, fixed=64)
    with pytest.raises(ValueError, match="at least 1 x 1"):
        padded_shape(0, 5)
    with pytest.raises(ValueError, match="multiple"):
        padded_shape(5, 5, multiple=0)


@pytest.mark.parametrize("h,w", ODD_SIZES)
def test_pad_crop_round_trip(h: int, w: int) -> None:
    die = random_dies(h, w)
    H, W = padded_shape(h, w)
    padded = pad_map(die, H, W)
    assert padded.shape == (H, W) and padded.dtype == np.uint8
    assert H % 32 == 0 and W % 32 == 0 and H - h < 32 and W - w < 32
    assert not padded[h:].any() and not padded[:, w:].any()  # padding is no die, bottom/right only
    np.testing.assert_array_equal(crop_map(padded, h, w), die)


@pytest.mark.parametrize("h,w", [(1, 1), (56, 53), (212, 204)])
def test_pad_crop_batched_tensors(h: int, w: int) -> None:
    die = torch.from_numpy(np.stack([random_dies(h, w, s) for s in range(3)]))
    padded = pad_map(die, *padded_shape(h, w, fixed=224))
    assert isinstance(padded, torch.Tensor) and padded.shape == (3, 224, 224)
    assert torch.equal(crop_map(padded, h, w), die)
    scores = torch.randn(3, 5, 224, 224)  # network output (N, C, H, W) crops the same way
    assert crop_map(scores, h, w).shape == (3, 5, h, w)


def test_pad_and_crop_reject_wrong_sizes() -> None:
    with pytest.raises(ValueError, match="smaller"):
        pad_map(np.zeros((40, 40), np.uint8), 32, 64)
    with pytest.raises(ValueError, match="larger"):
        crop_map(np.zeros((32, 32), np.uint8), 33, 5)


def test_one_hot_dies_channels() -> None:
    die = np.array([[[0, 1], [2, 1]]], dtype=np.uint8)
    x = one_hot_dies(die)
    assert x.dtype == torch.float32 and x.shape == (1, 3, 2, 2)
    expected = torch.tensor([[[1, 0], [0, 0]], [[0, 1], [0, 1]], [[0, 0], [1, 0]]], dtype=torch.float32)
    assert torch.equal(x[0], expected)
    padded = one_hot_dies(pad_map(die, 32, 32))
    assert torch.equal(padded.sum(1), torch.ones(1, 32, 32))  # exactly one state per position
    assert padded[0, 0, 2:, :].eq(1).all() and padded[0, 0, :, 2:].eq(1).all()  # padding = no die


def test_one_hot_dies_rejects_bad_states() -> None:
    with pytest.raises(ValueError, match="0 \\(no die\\), 1 \\(pass\\) or 2 \\(fail\\)"):
        one_hot_dies(np.array([[[0, 3]]], dtype=np.uint8))
    with pytest.raises(ValueError, match="integer"):
        one_hot_dies(torch.zeros(1, 2, 2))


def test_train_targets_rules() -> None:
    die = torch.tensor([[[0, 1, 2, 2], [2, 1, 0, 2]]], dtype=torch.uint8)
    label = torch.tensor([[[0, 0, 3, 0], [1, 0, 0, 4]]], dtype=torch.uint8)
    t = train_targets(die, label)
    assert t.dtype == torch.int64
    I = IGNORE_INDEX  # noqa: E741
    assert t.tolist() == [[[I, I, 3, 0], [1, I, I, 4]]]  # labels on fail dies only
    with pytest.raises(ValueError, match="differ in shape"):
        train_targets(die, label[..., :3])


def test_collate_pads_to_common_shape() -> None:
    dies = [random_dies(26, 26, 1), random_dies(56, 53, 2), random_dies(1, 1, 3)]
    labels = [np.where(d == 2, 3, 0).astype(np.uint8) for d in dies]
    b = collate(dies, labels)
    assert isinstance(b, Batch)
    assert b.x.shape == (3, 3, 64, 64) and b.die.shape == (3, 64, 64) and b.target.shape == (3, 64, 64)
    assert b.die.dtype == torch.uint8 and b.target.dtype == torch.int64 and b.x.dtype == torch.float32
    assert b.sizes == [(26, 26), (56, 53), (1, 1)]
    for i, (d, (h, w)) in enumerate(zip(dies, b.sizes)):
        assert np.array_equal(crop_map(b.die[i].numpy(), h, w), d)
        assert (b.target[i, h:] == IGNORE_INDEX).all() and (b.target[i, :, w:] == IGNORE_INDEX).all()
        assert torch.equal(b.x[i].argmax(0).to(torch.uint8), b.die[i])
    fail = b.die == 2
    assert (b.target[fail] == 3).all() and (b.target[~fail] == IGNORE_INDEX).all()


def test_collate_fixed_unlabelled_and_errors() -> None:
    dies = [random_dies(10, 12), random_dies(20, 3)]
    b = collate(dies, None, fixed=40)
    assert b.x.shape == (2, 3, 40, 40) and b.target is None
    b = collate(dies, [np.full((10, 12), 2, np.uint8), None])
    assert (b.target[1] == IGNORE_INDEX).all()  # a row without die-level labels trains on nothing
    assert (b.target[0][b.die[0] == 2] == 2).all()
    with pytest.raises(ValueError, match="label map"):
        collate(dies, [np.zeros((3, 3), np.uint8), None])
    with pytest.raises(ValueError, match="2 die maps but 1 label maps"):
        collate(dies, [None])
    with pytest.raises(ValueError, match="smaller"):
        collate(dies, None, fixed=16)
    with pytest.raises(ValueError, match="empty"):
        collate([], None)


def test_size_buckets_never_mix_shapes() -> None:
    rng = np.random.default_rng(0)
    h = rng.integers(1, 220, size=500)
    w = np.clip(h + rng.integers(-10, 10, size=500), 1, None)
    batches = size_buckets(h, w, batch_size=16)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(500))  # every row exactly once
    for b in batches:
        assert 1 <= len(b) <= 16
        assert len({padded_shape(int(h[i]), int(w[i])) for i in b}) == 1
    shapes = [padded_shape(int(h[b[0]]), int(w[b[0]])) for b in batches]
    assert shapes == sorted(shapes)  # unshuffled: ascending shape, then index
    assert all(b == sorted(b) for b in batches)
    # only the last batch of each shape may be short
    n_shapes = len(set(shapes))
    assert sum(len(b) < 16 for b in batches) <= n_shapes


def test_size_buckets_small_maps_not_padded_to_largest() -> None:
    batches = size_buckets([26, 27, 212, 30], [26, 25, 204, 31], batch_size=8)
    assert batches == [[0, 1, 3], [2]]


def test_size_buckets_shuffle_is_deterministic() -> None:
    h = np.arange(1, 101)
    a = size_buckets(h, h, batch_size=4, shuffle=True, seed=7)
    b = size_buckets(h, h, batch_size=4, shuffle=True, seed=7)
    c = size_buckets(h, h, batch_size=4, shuffle=True, seed=8)
    assert a == b and a != c
    assert sorted(i for x in a for i in x) == list(range(100))
    assert a != size_buckets(h, h, batch_size=4)


def test_size_buckets_fixed_and_errors() -> None:
    assert size_buckets([3, 50, 7], [4, 60, 7], batch_size=2, fixed=64) == [[0, 1], [2]]
    assert size_buckets([], [], batch_size=2) == []
    with pytest.raises(ValueError, match="map 1 \\(70 x 60\\)"):
        size_buckets([3, 70], [4, 60], batch_size=2, fixed=64)
    with pytest.raises(ValueError, match="equal in length"):
        size_buckets([3, 70], [4], batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        size_buckets([3], [4], batch_size=0)
