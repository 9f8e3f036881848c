"""fcn_core.inference.packed: packed maps, size-bucketed batches, the forward passes."""
import numpy as np
import pyarrow as pa
import pytest
import torch

from fakes import ConstantModel
from fcn_core.inference.fastpath import fast_module
from fcn_core.inference.packed import label_packed, pack_maps, packed_column, predict_maps, predict_packed
from fcn_core.models import build_fcn
from fcn_core.synth import generate_wafers
from fcn_core.table import FAIL, die_maps


@pytest.fixture(scope="module")
def table():
    return generate_wafers(40, seed=11)


def test_predictions_keep_each_maps_size_and_order(table):
    maps = die_maps(table)
    model = build_fcn("fcn8s", n_classes=5, preset="compact", geometry="aligned").eval()
    preds = predict_maps(model, maps, batch_size=7)
    assert [p.shape for p in preds] == [m.shape for m in maps]
    assert all(p.dtype == np.uint8 for p in preds)
    # batching does not change the answer
    one_by_one = [predict_maps(model, [m], batch_size=1)[0] for m in maps[:5]]
    for a, b in zip(preds[:5], one_by_one):
        np.testing.assert_array_equal(a, b)


def test_only_fail_dies_carry_a_pattern(table):
    maps = die_maps(table)
    preds = predict_maps(ConstantModel(2), maps)
    for die, pred in zip(maps, preds):
        assert (pred[die != FAIL] == 0).all()
        assert (pred[die == FAIL] == 2).all()


def test_a_prepared_net_gives_what_predict_packed_gives(table):
    """label_packed runs a fast copy as it is: the path a Scorer takes with its kept copy."""
    torch.manual_seed(0)
    model = build_fcn("fcn8s", n_classes=5).eval()
    maps = packed_column(table)
    for channels_last in (True, False):
        net = fast_module(model, channels_last=channels_last)
        np.testing.assert_array_equal(
            label_packed(net, maps, channels_last=channels_last, bf16=False, batch_size=5),
            predict_packed(model, maps, channels_last=channels_last, bf16=False, batch_size=5))


def test_packed_column_reads_sliced_and_chunked_columns(table):
    for t in (table.slice(5, 17), pa.concat_tables([table.slice(0, 7), table.slice(30, 6)])):
        packed = packed_column(t)
        assert len(packed) == t.num_rows
        np.testing.assert_array_equal(packed.sizes, [m.size for m in die_maps(t)])
        for a, b in zip(packed.unpack(), die_maps(t)):
            np.testing.assert_array_equal(a, b)


def test_bad_die_maps_are_rejected(table):
    m = build_fcn("fcn8s", n_classes=5)
    with pytest.raises(ValueError, match="die states"):
        predict_maps(m, [np.full((4, 4), 3, np.uint8)])
    with pytest.raises(ValueError, match="2-D"):
        pack_maps([np.zeros(4, np.uint8)])
    short = table.slice(0, 2).set_column(5, "die_map", pa.array([b"\x01", b"\x02"], pa.binary()))
    with pytest.raises(ValueError, match="expected"):
        packed_column(short)
    with pytest.raises(ValueError, match="batch_size"):
        predict_maps(m, die_maps(table)[:2], batch_size=0)


def test_mirror_tta_averages_each_map_with_its_own_mirror_image(table):
    """Maps of several sizes in one padded batch: each is mirrored within its own corner, so the
    answer is what labelling each map and its mirror image separately and averaging gives."""
    from fcn_core.weak import softmax_maps

    torch.manual_seed(0)
    model = build_fcn("fcn1s", n_classes=5, preset="compact", geometry="aligned").eval()
    with torch.no_grad():  # a fresh FCN-1s's skips start at zero: give every layer something to say
        for p in model.parameters():
            p.normal_(0, 0.15)
    maps = [np.ascontiguousarray(m[:m.shape[0] - 3 * (i % 4), :m.shape[1] - 4 * (i % 3)])  # several sizes
            for i, m in enumerate(die_maps(table)[:12])]
    assert len({m.shape for m in maps}) > 4
    tta = pack_maps(maps).unpack(label_packed(model, pack_maps(maps), channels_last=False, tta="mirror", bf16=False))
    plain = pack_maps(maps).unpack(label_packed(model, pack_maps(maps), channels_last=False, bf16=False))
    as_is = softmax_maps(model, maps, batch_size=1)
    mirrored = softmax_maps(model, [np.ascontiguousarray(m[:, ::-1]) for m in maps], batch_size=1)
    checked = 0
    for die, got, p, q in zip(maps, tta, as_is, mirrored):
        mean = p + q[:, :, ::-1]
        top2 = np.sort(mean, axis=0)[-2:]
        clear = (die == FAIL) & (top2[1] - top2[0] > 1e-3)  # near-ties may go either way in float32
        np.testing.assert_array_equal(got[clear], mean.argmax(0)[clear])
        checked += int(clear.sum())
        assert (got[die != FAIL] == 0).all()
    assert checked > 1000
    assert any((a != b).any() for a, b in zip(tta, plain))  # the mirror image does change labels
    with pytest.raises(ValueError, match="test-time augmentation"):
        label_packed(model, pack_maps(maps[:1]), channels_last=False, tta="rotate")
