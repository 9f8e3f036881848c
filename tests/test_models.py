from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

from fcn_core.models import (
    GEOMETRIES,
    MODEL_NAMES,
    CoordMap,
    FCN8s,
    FCN16s,
    FCN32s,
    bilinear_kernel,
    build_fcn,
    count_parameters,
    fcn_from_arch,
    from_coarser,
    forward_gflops,
    load_vgg16_imagenet,
)
from fcn_core.padding import IGNORE_INDEX, collate

SIZES = [(1, 1), (26, 26), (56, 53), (64, 64), (212, 204)]
SEED_OFFSETS = {
    "fcn32s": {"upscore": 19},
    "fcn16s": {"score_pool4": 5, "upscore16": 27},
    "fcn8s": {"score_pool4": 5, "score_pool3": 9, "upscore8": 31},
}
UPSAMPLERS = {"fcn32s": ["upscore"], "fcn16s": ["upscore2", "upscore16"],
              "fcn8s": ["upscore2", "upscore_pool4", "upscore8"]}


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def meta_fcn(name: str, **kw) -> nn.Module:
    """Structure only (no memory, no arithmetic): enough for shapes, counts and geometry of vgg16."""
    with torch.device("meta"):
        return build_fcn(name, **kw)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_compact_output_matches_input_size(name: str, geometry: str) -> None:
    model = build_fcn(name, n_classes=5, geometry=geometry).eval()
    with torch.no_grad():
        for h, w in SIZES:
            out = model(torch.rand(1, 3, h, w))
            assert out.shape == (1, 5, h, w)
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_vgg16_output_matches_input_size(name: str, geometry: str) -> None:
    model = meta_fcn(name, n_classes=21, preset="vgg16", geometry=geometry).eval()
    for h, w in SIZES:
        assert model(torch.zeros(2, 3, h, w, device="meta")).shape == (2, 21, h, w)


def test_vgg16_real_forward_on_a_small_map() -> None:
    model = build_fcn("fcn8s", n_classes=3, preset="vgg16", geometry="aligned").eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 26, 26))
    assert out.shape == (1, 3, 26, 26) and torch.isfinite(out).all()


def test_vgg16_fcn8s_parameter_count() -> None:
    assert count_parameters(meta_fcn("fcn8s", n_classes=21, preset="vgg16", geometry="classic")) == 134_489_759
    assert count_parameters(meta_fcn("fcn8s", n_classes=21, preset="vgg16", geometry="aligned")) == 134_489_759


def test_seed_layer_names_and_sizes() -> None:
    m = meta_fcn("fcn8s", n_classes=21, preset="vgg16", geometry="classic")
    assert m.conv1_1.padding == (100, 100) and m.conv1_2.padding == (1, 1)
    assert all(getattr(m, f"pool{i}").ceil_mode for i in range(1, 6))
    assert m.fc6.weight.shape == (4096, 512, 7, 7) and m.fc7.weight.shape == (4096, 4096, 1, 1)
    assert m.score_pool4.weight.shape == (21, 512, 1, 1) and m.score_pool3.weight.shape == (21, 256, 1, 1)
    assert isinstance(m.drop6, nn.Dropout2d) and isinstance(m.relu7, nn.ReLU)
    for up, (k, s) in {"upscore2": (4, 2), "upscore_pool4": (4, 2), "upscore8": (16, 8)}.items():
        layer = getattr(m, up)
        assert layer.kernel_size == (k, k) and layer.stride == (s, s) and layer.bias is None
    assert meta_fcn("fcn32s", n_classes=21, preset="vgg16").upscore.kernel_size == (64, 64)
    assert meta_fcn("fcn16s", n_classes=21, preset="vgg16").upscore16.stride == (16, 16)
    keys = set(m.state_dict())
    assert {"conv1_1.weight", "conv5_3.bias", "fc6.weight", "score_fr.bias", "upscore8.weight"} <= keys
    assert not any("." in k.rsplit(".", 1)[0] for k in keys)  # flat, as in the classic layout


@pytest.mark.parametrize("name", sorted(SEED_OFFSETS))  # finer stages: test_output_is_centred_on_the_input_grid
def test_crop_offsets_from_geometry(name: str) -> None:
    assert meta_fcn(name, n_classes=21, preset="vgg16", geometry="classic").crop_offsets == SEED_OFFSETS[name]
    assert build_fcn(name, n_classes=5, geometry="classic").crop_offsets == SEED_OFFSETS[name]  # widths don't matter
    aligned = build_fcn(name, n_classes=5, geometry="aligned").crop_offsets
    assert aligned.keys() == SEED_OFFSETS[name].keys() and set(aligned.values()) == {0}


def test_coord_map_follows_caffe() -> None:
    g = CoordMap().then(nn.Conv2d(3, 8, 3, padding=100))
    assert g == CoordMap(Fraction(1), Fraction(99))
    g = g.then(nn.MaxPool2d(2, stride=2, ceil_mode=True))
    assert g == CoordMap(Fraction(1, 2), Fraction(99, 2) - Fraction(1, 4))
    up = CoordMap(Fraction(1, 32), Fraction(-31, 64)).then(nn.ConvTranspose2d(2, 2, 64, stride=32, padding=16))
    assert up == CoordMap(Fraction(1), Fraction(0))
    assert CoordMap().then(nn.BatchNorm2d(3)) == CoordMap()  # per-pixel layers keep the grid
    with pytest.raises(TypeError, match="Linear"):
        CoordMap().then(nn.Linear(3, 3))


def mirror_symmetric(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
                layer.weight.copy_((layer.weight + layer.weight.flip(-1)) / 2)
    return model


# sizes whose pooling chain stays even, so both geometries are mirror symmetric
SYMMETRIC_SIZE = {"aligned": (64, 96), "classic": (26, 58)}  # classic: 26 + 198 = 224 = 7 * 32


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_output_is_centred_on_the_input_grid(name: str, geometry: str) -> None:
    """With left-right symmetric kernels, mirroring the map must mirror the scores exactly.

    A crop one die off shifts the output and breaks the symmetry; the computed offsets restore it.
    """
    torch.manual_seed(0)
    model = mirror_symmetric(build_fcn(name, n_classes=2, geometry=geometry)).eval()
    x = torch.rand(1, 3, *SYMMETRIC_SIZE[geometry])
    with torch.no_grad():
        for name, layer in model.named_children():
            if name.startswith("score_"):
                layer.weight.normal_()  # make every skip matter
        torch.testing.assert_close(model(x.flip(-1)), model(x).flip(-1))
        final = getattr(model, model.final[0])
        if not isinstance(final, nn.ConvTranspose2d):  # FCN-1s: no final upsampler to shift
            return
        offset = model.crop_offsets[model.final[0]]
        delta = -1 if final.padding[0] > 0 else 1
        final.padding = (final.padding[0] + delta,) * 2  # the output moves by one die...
        with pytest.raises(AssertionError):  # ...so the old crop offset is now wrong
            torch.testing.assert_close(model(x.flip(-1)), model(x).flip(-1))
        model.crop_offsets, model._fuse_offsets = model._crop_geometry()
        assert model.crop_offsets[model.final[0]] == offset - delta
        torch.testing.assert_close(model(x.flip(-1)), model(x).flip(-1))


def test_initialisation() -> None:
    torch.manual_seed(0)
    m = build_fcn("fcn8s", n_classes=5, preset="compact")
    for name in UPSAMPLERS["fcn8s"]:
        w = getattr(m, name).weight
        assert torch.equal(w, bilinear_kernel(5, w.shape[-1])) and w.requires_grad
    for name in ("score_pool4", "score_pool3"):
        assert not getattr(m, name).weight.any() and not getattr(m, name).bias.any()
    assert 0 < m.score_fr.weight.std() < 0.02
    w = m.conv3_2.weight  # He: std = sqrt(2 / fan_in)
    assert w.std().item() == pytest.approx((2 / w[0].numel()) ** 0.5, rel=0.1)
    assert not m.conv3_2.bias.any() and not m.fc6.bias.any()


def test_bilinear_kernel_upsamples_constants() -> None:
    up = nn.ConvTranspose2d(2, 2, 16, stride=8, padding=4, bias=False)
    with torch.no_grad():
        up.weight.copy_(bilinear_kernel(2, 16))
        out = up(torch.ones(1, 2, 4, 4))
    assert out.shape == (1, 2, 32, 32)
    torch.testing.assert_close(out[..., 4:-4, 4:-4], torch.ones(1, 2, 24, 24))  # interior: exact constant
    assert bilinear_kernel(3, 4)[0, 1].abs().sum() == 0  # no cross-class mixing


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_gradient_reaches_every_parameter(geometry: str) -> None:
    torch.manual_seed(0)
    m = build_fcn("fcn8s", n_classes=5, geometry=geometry)
    x = torch.rand(2, 3, 20, 18)
    loss = nn.functional.cross_entropy(m(x), torch.randint(0, 5, (2, 20, 18)))
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def toy_batch():
    """Four 32 x 32 round wafers with edge rings, scratches, blobs and centre clusters."""
    size, rng = 32, np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    c = (size - 1) / 2
    r = np.hypot(yy - c, xx - c) / (size / 2)
    dies, labels = [], []
    for i in range(4):
        die = np.where(r <= 1, 1, 0).astype(np.uint8)
        label = np.zeros_like(die)
        fail = (rng.random(die.shape) < 0.05) & (die == 1)
        patterns = {1: r > 0.8, 2: (np.abs(yy - xx - i + 2) < 1) & (r < 0.7),
                    3: np.hypot(yy - 1.4 * c, xx - 0.7 * c) < 4, 4: r < 0.3}
        for k, mask in patterns.items():
            if (i + k) % 2 == 0:
                mask = mask & (die == 1)
                fail |= mask
                label[mask] = k
        die[fail] = 2
        dies.append(die)
        labels.append(label)
    return collate(dies, labels)


def test_compact_fcn8s_overfits_one_batch(one_thread) -> None:
    torch.manual_seed(0)
    batch = toy_batch()
    m = build_fcn("fcn8s", n_classes=5, preset="compact", geometry="aligned")
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    losses = []
    for _ in range(60):
        loss = nn.functional.cross_entropy(m(batch.x), batch.target, ignore_index=IGNORE_INDEX)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 1.3  # starts near ln(5): uniform scores
    assert min(losses[-5:]) < 0.3, losses[-5:]
    with torch.no_grad():
        pred = m.eval()(batch.x).argmax(1)
    on_fail = batch.target != IGNORE_INDEX
    assert (pred[on_fail] == batch.target[on_fail]).float().mean() > 0.9


def perturbed(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # stands in for training
    return model


def assert_bilinear(model: nn.Module, names: list[str]) -> None:
    for name in names:
        w = getattr(model, name).weight
        assert torch.equal(w, bilinear_kernel(w.shape[0], w.shape[-1])), name


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_staged_fine_tuning_copies_and_initialises(geometry: str) -> None:
    torch.manual_seed(0)
    m32 = perturbed(build_fcn("fcn32s", n_classes=4, geometry=geometry))
    m16 = FCN16s.from_fcn32s(m32)
    assert isinstance(m16, FCN16s)
    assert m16.arch == {**m32.arch, "name": "fcn16s"}
    s32, s16 = m32.state_dict(), m16.state_dict()
    copied = set(s32) & set(s16)
    assert copied == set(s32) - {"upscore.weight"}
    assert all(torch.equal(s32[k], s16[k]) for k in copied)
    assert not m16.score_pool4.weight.any() and not m16.score_pool4.bias.any()
    assert_bilinear(m16, ["upscore2", "upscore16"])

    m16 = perturbed(m16)
    m8 = FCN8s.from_fcn16s(m16)
    s16, s8 = m16.state_dict(), m8.state_dict()
    assert set(s16) & set(s8) == set(s16) - {"upscore16.weight"}
    assert all(torch.equal(s16[k], s8[k]) for k in set(s16) & set(s8))  # incl. score_pool4, upscore2
    assert not m8.score_pool3.weight.any()
    assert_bilinear(m8, ["upscore_pool4", "upscore8"])
    with pytest.raises(TypeError, match="FCN16s"):
        FCN8s.from_fcn16s(m32)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_finer_stages_start_as_the_coarser_model(geometry: str) -> None:
    """FCN-4s/2s/1s: one more zero-initialised skip each, everything else copied."""
    torch.manual_seed(0)
    coarser = perturbed(build_fcn("fcn8s", n_classes=4, geometry=geometry))
    for name, new_score, new_ups in (("fcn4s", "score_pool2", ["upscore_pool3", "upscore4"]),
                                     ("fcn2s", "score_pool1", ["upscore_pool2", "upscore2_out"]),
                                     ("fcn1s", "score_conv1_2", ["upscore_pool1"])):
        finer = from_coarser(name, coarser)
        assert finer.arch == {**coarser.arch, "name": name}
        old, new = coarser.state_dict(), finer.state_dict()
        assert all(torch.equal(old[k], new[k]) for k in set(old) & set(new))
        assert set(new) - set(old) == {f"{new_score}.weight", f"{new_score}.bias", *(f"{u}.weight" for u in new_ups)}
        assert not getattr(finer, new_score).weight.any()
        assert_bilinear(finer, new_ups)
        coarser = perturbed(finer)
    x = torch.randn(2, 3, 45, 38)
    fcn2s = from_coarser("fcn2s", perturbed(from_coarser("fcn4s", perturbed(build_fcn("fcn8s", n_classes=4)))))
    # FCN-1s has no final upsampler; at its start it computes exactly what FCN-2s did
    assert torch.allclose(from_coarser("fcn1s", fcn2s).eval()(x), fcn2s.eval()(x), atol=1e-5)
    with pytest.raises(TypeError, match="coarser FCN"):
        from_coarser("fcn1s", coarser)  # coarser is an FCN1s now
    with pytest.raises(TypeError, match="coarser FCN"):
        from_coarser("fcn4s", build_fcn("fcn2s", n_classes=4))  # finer, not coarser
    with pytest.raises(ValueError, match="no coarser stage"):
        from_coarser("fcn32s", coarser)


def test_a_stage_can_be_skipped() -> None:
    """FCN-1s straight from FCN-8s: every skip FCN-8s lacks starts at zero, the rest is copied."""
    torch.manual_seed(0)
    m8 = perturbed(build_fcn("fcn8s", n_classes=4))
    m1 = from_coarser("fcn1s", m8)
    old, new = m8.state_dict(), m1.state_dict()
    assert all(torch.equal(old[k], new[k]) for k in set(old) & set(new))
    for score in ("score_pool2", "score_pool1", "score_conv1_2"):
        assert not getattr(m1, score).weight.any()
    assert_bilinear(m1, ["upscore_pool3", "upscore_pool2", "upscore_pool1"])


def test_batch_norm_trunk() -> None:
    m = build_fcn("fcn8s", n_classes=5, batch_norm=True)
    bns = [n for n, layer in m.named_children() if isinstance(layer, nn.BatchNorm2d)]
    assert len(bns) == 13 and bns[0] == "bn1_1" and bns[-1] == "bn5_3"
    assert m.arch["batch_norm"] is True
    rebuilt = fcn_from_arch(m.arch)
    rebuilt.load_state_dict(m.state_dict())  # strict: BN weights and running stats included
    assert m.crop_offsets == build_fcn("fcn8s", n_classes=5).crop_offsets
    with pytest.raises(ValueError, match="batch_norm=False"):
        load_vgg16_imagenet(build_fcn("fcn32s", n_classes=5, preset="vgg16", batch_norm=True), "absent.pth")


def test_arch_round_trip_and_errors() -> None:
    m = build_fcn("fcn16s", n_classes=7, geometry="classic")
    assert m.arch == {"name": "fcn16s", "n_classes": 7, "preset": "compact", "geometry": "classic",
                      "input_norm": "none", "batch_norm": False}
    rebuilt = fcn_from_arch(m.arch)
    assert type(rebuilt) is FCN16s
    rebuilt.load_state_dict(m.state_dict())  # strict: same keys and shapes
    assert isinstance(fcn_from_arch({"name": "fcn32s", "n_classes": 2}), FCN32s)
    with pytest.raises(ValueError, match="unknown model 'fcn64s'"):
        build_fcn("fcn64s", n_classes=5)
    with pytest.raises(ValueError, match="unknown preset"):
        build_fcn("fcn8s", n_classes=5, preset="resnet")
    with pytest.raises(ValueError, match="unknown geometry"):
        build_fcn("fcn8s", n_classes=5, geometry="same")
    with pytest.raises(ValueError, match="bad arch"):
        fcn_from_arch({"name": "fcn8s", "n_classes": 5, "depth": 3})
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        m(torch.zeros(1, 4, 8, 8))


def test_load_vgg16_imagenet(tmp_path) -> None:
    torchvision = pytest.importorskip("torchvision")
    with pytest.raises(ValueError, match="preset='vgg16'"):
        load_vgg16_imagenet(build_fcn("fcn32s", n_classes=5), tmp_path / "absent.pth")
    torch.manual_seed(0)
    path = tmp_path / "vgg16.pth"
    state = torchvision.models.vgg16(weights=None).state_dict()
    torch.save(state, path)
    m = meta_fcn("fcn32s", n_classes=5, preset="vgg16", geometry="aligned").to_empty(device="cpu")  # skip init
    assert load_vgg16_imagenet(m, path) is m
    assert torch.equal(m.conv1_1.weight, state["features.0.weight"])
    assert torch.equal(m.conv2_1.bias, state["features.5.bias"])
    assert torch.equal(m.conv5_3.weight, state["features.28.weight"])
    assert torch.equal(m.fc6.weight, state["classifier.0.weight"].view(4096, 512, 7, 7))
    assert torch.equal(m.fc7.weight, state["classifier.3.weight"].view(4096, 4096, 1, 1))
    assert torch.equal(m.fc7.bias, state["classifier.3.bias"])
    assert m.arch["input_norm"] == "imagenet" and fcn_from_arch(m.arch).input_norm == "imagenet"
    del state
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, path)
    with pytest.raises(ValueError, match="not a torchvision VGG16"):
        load_vgg16_imagenet(m, path)


def test_imagenet_input_norm_changes_the_input() -> None:
    torch.manual_seed(0)
    plain = build_fcn("fcn32s", n_classes=2).eval()
    normed = fcn_from_arch({**plain.arch, "input_norm": "imagenet"}).eval()
    normed.load_state_dict(plain.state_dict())
    x = torch.rand(1, 3, 16, 16)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(normed(x), plain((x - mean) / std))


def test_count_parameters_and_gflops_on_known_layers() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ConvTranspose2d(4, 2, 4, stride=2, padding=1, bias=False))
    assert count_parameters(net) == 3 * 4 * 9 + 4 + 4 * 2 * 16
    net[0].weight.requires_grad_(False)
    assert count_parameters(net, trainable_only=True) == 4 + 4 * 2 * 16
    macs = 8 * 6 * 4 * 3 * 9 + 8 * 6 * 4 * 2 * 16  # conv: per output; transposed: per input
    assert forward_gflops(net, 8, 6) == pytest.approx(2 * macs / 1e9)
    assert net.training  # mode restored


def test_aligned_is_far_cheaper_than_classic() -> None:
    kw = dict(n_classes=5, preset="vgg16")
    classic = forward_gflops(meta_fcn("fcn8s", geometry="classic", **kw), 64, 64)
    aligned = forward_gflops(meta_fcn("fcn8s", geometry="aligned", **kw), 64, 64)
    conv1_2_classic = 2 * 262 * 262 * 64 * 64 * 9 / 1e9  # the 100-pixel margin: conv1 runs on 262 x 262
    assert classic > conv1_2_classic and classic > 5 * aligned
