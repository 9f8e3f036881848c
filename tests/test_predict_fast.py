"""The fast inference path of fcn_core.predict: packed maps, sub-pixel upsamplers, threads."""
import numpy as np
import pyarrow as pa
import pytest
import torch
from torch import nn

from fcn_core.models import build_fcn
from fcn_core.predict import (SubPixelConvTranspose2d, column_name, inference_view, intra_op_threads, pack_maps,
                              packed_column, predict_maps, score_table)
from fcn_core.synth import generate_wafers
from fcn_core.table import FAIL, die_maps


@pytest.fixture(scope="module")
def table():
    return generate_wafers(40, seed=11)


def _confident_model(seed=0, **kw):
    """Random trunk with larger score weights: logits far from ties, so only real changes flip labels."""
    torch.manual_seed(seed)
    m = build_fcn("fcn8s", n_classes=5, **kw)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("score"):
                p.normal_(0, 0.2)
    return m.eval()


@pytest.mark.parametrize("stride,padding,size", [(2, 1, (4, 5)), (2, 0, (6, 3)), (8, 4, (3, 4)), (8, 0, (5, 5)),
                                                 (16, 8, (2, 3)), (32, 0, (2, 2))])
def test_subpixel_upsampler_is_the_transposed_conv(stride, padding, size):
    torch.manual_seed(stride + padding)
    deconv = nn.ConvTranspose2d(5, 5, 2 * stride, stride=stride, padding=padding, bias=True)
    x = torch.randn(3, 5, *size, requires_grad=True)
    ref = deconv(x)
    got = SubPixelConvTranspose2d(deconv)(x)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # gradients reach the shared deconv weights the same way
    g_ref = torch.autograd.grad(ref.square().sum(), deconv.weight)[0]
    g_got = torch.autograd.grad(got.square().sum(), deconv.weight)[0]
    torch.testing.assert_close(g_got, g_ref, rtol=1e-4, atol=1e-4)


def test_subpixel_refuses_what_it_cannot_compute():
    assert not SubPixelConvTranspose2d.supports(nn.ConvTranspose2d(5, 5, 3, stride=2))  # kernel not k*stride
    assert not SubPixelConvTranspose2d.supports(nn.Conv2d(5, 5, 3))
    with pytest.raises(ValueError, match="sub-pixel"):
        SubPixelConvTranspose2d(nn.ConvTranspose2d(5, 5, 3, stride=2))


def test_inference_view_shares_weights_and_leaves_the_model_alone():
    m = build_fcn("fcn8s", n_classes=5)
    view = inference_view(m)
    assert isinstance(view.upscore8, SubPixelConvTranspose2d) and isinstance(m.upscore8, nn.ConvTranspose2d)
    assert view.upscore8.deconv is m.upscore8 and view.conv1_1 is m.conv1_1
    assert inference_view(nn.Identity()).__class__ is nn.Identity


@pytest.mark.parametrize("geometry", ["aligned", "classic"])
def test_speed_options_do_not_change_fp32_answers(table, geometry):
    maps = die_maps(table)[:12]
    m = _confident_model(geometry=geometry)
    ref = predict_maps(m, maps, bf16=False, channels_last=False, subpixel=False)
    m = _confident_model(geometry=geometry)
    fast = predict_maps(m, maps, bf16=False, max_batch_pixels=3 * 32 * 32)
    fail = np.concatenate([d[d == FAIL] for d in maps]).size
    diff = sum(int((a != b).sum()) for a, b in zip(ref, fast))
    assert diff <= max(1, fail // 1000)  # float reassociation only


def test_bf16_stays_close_to_fp32(table):
    maps = die_maps(table)
    m = _confident_model()
    a = np.concatenate([p.ravel() for p in predict_maps(m, maps, bf16=False)])
    b = np.concatenate([p.ravel() for p in predict_maps(m, maps, bf16=True)])
    fail = np.concatenate([d.ravel() for d in maps]) == FAIL
    assert (a[fail] == b[fail]).mean() > 0.99


def test_predict_leaves_the_model_trainable(table):
    m = build_fcn("fcn8s", n_classes=5)
    predict_maps(m, die_maps(table)[:3])
    m.train()
    m(torch.zeros(2, 3, 32, 32)).sum().backward()  # no "inference tensors cannot be saved for backward"
    assert m.conv1_1.weight.grad is not None


def test_packed_column_reads_sliced_and_chunked_columns(table):
    for t in (table.slice(5, 17), pa.concat_tables([table.slice(0, 7), table.slice(30, 6)])):
        packed = packed_column(t)
        assert len(packed) == t.num_rows
        for a, b in zip(packed.unpack(), die_maps(t)):
            np.testing.assert_array_equal(a, b)


def test_score_table_pred_map_matches_predict_maps_on_a_slice(table):
    from fcn_core.config import load_config

    from fcn_core.verdicts import shaped_maps

    part = table.slice(9, 13)
    m = _confident_model()
    preds = predict_maps(m, die_maps(part))
    every = {"ring": 4.0, "scratch": 4.0, "local zone": 4.0, "circle": 4.0}
    for rules in ({}, {"scratch": 4.0}, every):
        cfg = load_config("tiny", {"verdict.min_elongation_by_class": rules})
        out = score_table(m, part, cfg=cfg, model_name="m", model_version="1")
        # pred_map is what the dies_* columns count: the network's map after the shape rules
        shaped = shaped_maps(preds, die_maps(part), class_names=cfg.class_names, verdict=cfg.verdict)
        for blob, pred in zip(out.column("pred_map").to_pylist(), shaped):
            assert blob == pred.tobytes()
        assert out.column("fail_dies").to_pylist() == [int((d == FAIL).sum()) for d in die_maps(part)]
        for cid, name in enumerate(cfg.class_names[1:], start=1):
            counted = [int(((p == cid) & (d == FAIL)).sum()) for p, d in zip(shaped, die_maps(part))]
            assert out.column(column_name(name)).to_pylist() == counted
        changed = sum(not np.array_equal(a, b) for a, b in zip(shaped, preds))
        assert (changed > 0) == bool(rules)  # the rules did act on this model's maps


def test_bad_die_maps_are_rejected(table):
    m = build_fcn("fcn8s", n_classes=5)
    with pytest.raises(ValueError, match="die states"):
        predict_maps(m, [np.full((4, 4), 3, np.uint8)])
    with pytest.raises(ValueError, match="2-D"):
        pack_maps([np.zeros(4, np.uint8)])
    short = table.slice(0, 2).set_column(5, "die_map", pa.array([b"\x01", b"\x02"], pa.binary()))
    with pytest.raises(ValueError, match="expected"):
        packed_column(short)


def test_num_threads_is_scoped():
    before = torch.get_num_threads()
    with intra_op_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError):
        with intra_op_threads(0):
            pass
