"""fcn_core.inference.fastpath: the fast copy of a network, sub-pixel upsamplers."""
import numpy as np
import pytest
import torch
from torch import nn

from fcn_core.inference.fastpath import (SubPixelConvTranspose2d, fast_module, one_hot_channels_last,
                                         with_subpixel_upsamplers)
from fcn_core.inference.packed import predict_maps
from fcn_core.models import build_fcn
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


def _snapshot(model: nn.Module) -> dict:
    """Values, storage and memory layout of every parameter, and the module types of the children."""
    return {"params": {k: (v.detach().clone(), v.data_ptr(), v.stride(), v.requires_grad)
                       for k, v in model.named_parameters()},
            "children": {k: type(v) for k, v in model.named_children()}, "training": model.training}


def _assert_unchanged(model: nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert after["children"] == before["children"] and after["training"] == before["training"]
    for name, (value, ptr, stride, grad) in before["params"].items():
        now, now_ptr, now_stride, now_grad = after["params"][name]
        assert (now_ptr, now_stride, now_grad) == (ptr, stride, grad), name
        assert torch.equal(now, value), name


def test_fast_module_is_a_new_module_and_leaves_its_input_alone():
    model = _confident_model().train()
    before = _snapshot(model)
    net = fast_module(model)
    _assert_unchanged(model, before)
    assert isinstance(model.upscore8, nn.ConvTranspose2d) and isinstance(net.upscore8, SubPixelConvTranspose2d)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert net.conv1_1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not model.conv1_1.weight.is_contiguous(memory_format=torch.channels_last)
    assert net.conv1_1.weight.data_ptr() != model.conv1_1.weight.data_ptr()  # its own weights
    # and it computes the same function
    x = one_hot_channels_last(torch.randint(0, 3, (2, 40, 40)))
    with torch.no_grad():
        torch.testing.assert_close(net(x), model.eval()(x.contiguous()), rtol=1e-4, atol=1e-4)


def test_scoring_leaves_the_model_unchanged(table):
    model = _confident_model().train()
    before = _snapshot(model)
    predict_maps(model, die_maps(table)[:6])
    _assert_unchanged(model, before)


def test_subpixel_view_shares_weights_and_leaves_the_model_alone():
    m = build_fcn("fcn8s", n_classes=5)
    before = _snapshot(m)
    view = with_subpixel_upsamplers(m)
    _assert_unchanged(m, before)
    assert isinstance(view.upscore8, SubPixelConvTranspose2d) and isinstance(m.upscore8, nn.ConvTranspose2d)
    assert view.upscore8.deconv.weight is m.upscore8.weight and view.conv1_1.weight is m.conv1_1.weight
    x = torch.randn(1, 3, 40, 40)
    view(x).sum().backward()  # training through the view reaches the model's own weights
    assert m.upscore8.weight.grad is not None and m.conv1_1.weight.grad is not None
    identity = nn.Identity()
    assert type(with_subpixel_upsamplers(identity)) is nn.Identity


@pytest.mark.parametrize("geometry", ["aligned", "classic"])
def test_speed_options_do_not_change_fp32_answers(table, geometry):
    maps = die_maps(table)[:12]
    m = _confident_model(geometry=geometry)
    ref = predict_maps(m, maps, bf16=False, channels_last=False, subpixel=False)
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
