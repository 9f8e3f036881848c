"""FCN-32s, FCN-16s and FCN-8s (Long, Shelhamer & Darrell) as the seed deck teaches them, and the
same skip architecture carried on to FCN-4s, 2s and 1s for die-level wafer labels.

One trunk definition (VGG16 topology: conv blocks of 2, 2, 3, 3, 3 convs, ceil-mode max pools, fc6 and
fc7 as convolutions) serves every model; they differ only in the skip scores fused on the way
up. Attribute names are the seed's (``conv1_1`` ... ``upscore8``) so state dicts interchange with the
classic pytorch-fcn layout.

Presets: ``vgg16`` is the seed's network exactly; ``compact`` is the same topology with narrow widths
for CPU training. Geometries: ``classic`` keeps the seed's 100-pixel margin on ``conv1_1`` and crops the
upsampled scores; ``aligned`` uses 'same' padding everywhere so every blob lies on the input grid
and all crop offsets are zero. Crop offsets are derived from the layers' kernel/stride/padding the
way Caffe's crop layer does (see :class:`CoordMap`), never typed in.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fcn_core.stages import STAGES

IN_CHANNELS = 3  # one-hot die states: no die, pass, fail (fcn_core.padding.one_hot_dies)
BLOCK_DEPTHS = (2, 2, 3, 3, 3)  # convs per VGG16 block
MODEL_NAMES = STAGES  # one model per cascade stage, coarse to fine (fcn_core.stages)
GEOMETRIES = ("classic", "aligned")
INPUT_NORMS = ("none", "imagenet")
CLASSIC_MARGIN = 100  # conv1_1 padding of the reference FCN
# torchvision's ImageNet normalisation, used when a model starts from ImageNet VGG16 weights
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Geometry = Literal["classic", "aligned"]


@dataclass(frozen=True)
class Preset:
    widths: tuple[int, int, int, int, int]  # output channels of conv blocks 1..5
    fc_width: int  # channels of fc6 and fc7
    fc6_kernel: int = 7
    dropout: float = 0.5  # Dropout2d after fc6 and fc7


PRESETS: dict[str, Preset] = {
    "vgg16": Preset(widths=(64, 128, 256, 512, 512), fc_width=4096),
    # ~1/8 of VGG16's widths: wafer maps are 3-channel one-hot pictures of simple shapes, and CPU
    # throughput is the constraint (docs/models.md has the timings behind this choice).
    "compact": Preset(widths=(8, 16, 32, 64, 64), fc_width=128),
}


# -- layer geometry ------------------------------------------------------------------------------
def _square(value: int | tuple[int, ...], what: str) -> int:
    if isinstance(value, int):
        return value
    if len(set(value)) != 1:
        raise ValueError(f"crop geometry needs square {what}, got {value}")
    return int(value[0])


@dataclass(frozen=True)
class CoordMap:
    """Where a blob lies on the input grid: blob index y sits at input coordinate x with y = scale*x + offset.

    The same bookkeeping as Caffe's ``coord_map.py``: a conv/pool with kernel k, stride s, padding p
    maps y = (x + p - (k-1)/2) / s; a transposed conv maps y = s*x + (k-1)/2 - p; ReLU and dropout pass
    through. Two blobs of equal scale are aligned by cropping the one with the larger offset.
    """

    scale: Fraction = Fraction(1)
    offset: Fraction = Fraction(0)

    def then(self, layer: nn.Module) -> "CoordMap":
        if isinstance(layer, (nn.Conv2d, nn.MaxPool2d, nn.ConvTranspose2d)):
            k = _square(layer.kernel_size, "kernels")
            s = _square(layer.stride, "strides")
            p = _square(layer.padding, "padding")
            d = _square(layer.dilation, "dilation")
            k_eff = (k - 1) * d + 1
            if isinstance(layer, nn.ConvTranspose2d):
                a, b = Fraction(s), Fraction(k_eff - 1 - 2 * p, 2)
            else:
                a, b = Fraction(1, s), Fraction(2 * p - (k_eff - 1), 2 * s)
        elif isinstance(layer, (nn.ReLU, nn.Dropout, nn.Dropout2d, nn.Identity, nn.BatchNorm2d)):
            a, b = Fraction(1), Fraction(0)
        else:
            raise TypeError(f"no coordinate map for {type(layer).__name__}")
        return CoordMap(a * self.scale, a * self.offset + b)


def _crop_offset(bigger: CoordMap, reference: CoordMap, what: str) -> int:
    """Offset at which ``bigger`` must be cropped to lie on ``reference``'s grid."""
    if bigger.scale != reference.scale:
        raise ValueError(f"{what}: scale mismatch {bigger.scale} vs {reference.scale}")
    d = bigger.offset - reference.offset
    if d.denominator != 1:
        raise ValueError(f"{what}: non-integer crop offset {d}")
    return int(d)


# -- building blocks -----------------------------------------------------------------------------
def bilinear_kernel(channels: int, kernel_size: int) -> torch.Tensor:
    """(C, C, k, k) transposed-conv weight that upsamples each channel bilinearly (FCN's init)."""
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    og = torch.arange(kernel_size, dtype=torch.float64)
    filt1d = 1 - (og - center).abs() / factor
    weight = torch.zeros(channels, channels, kernel_size, kernel_size, dtype=torch.float64)
    weight[range(channels), range(channels)] = torch.outer(filt1d, filt1d)
    return weight.float()


def _upsampler(n_classes: int, stride: int, geometry: Geometry) -> nn.Module:
    # kernel 2*stride as in the seed; aligned: padding stride/2 makes the output exactly stride*input
    # and centres it on the input grid (crop offset 0). Stride 1 (FCN-1s) needs no upsampling.
    if stride == 1:
        return nn.Identity()
    padding = stride // 2 if geometry == "aligned" else 0
    return nn.ConvTranspose2d(n_classes, n_classes, 2 * stride, stride=stride, padding=padding, bias=False)


def _add_trunk(model: nn.Module, spec: Preset, geometry: Geometry, batch_norm: bool) -> tuple[str, ...]:
    """Register the VGG16-style trunk (conv1_1 ... drop7) on ``model``; return the names in order.

    ``batch_norm`` puts a BatchNorm2d (``bn1_1`` ...) between each block conv and its ReLU, as
    torchvision's ``vgg16_bn``: the paper's FCN had none and leant on ImageNet weights, but from
    scratch it is what makes the plain 13-conv trunk learn in minutes (docs/models.md).
    """
    names: list[str] = []

    def add(name: str, layer: nn.Module) -> None:
        model.add_module(name, layer)
        names.append(name)

    c_in = IN_CHANNELS
    for block, (depth, width) in enumerate(zip(BLOCK_DEPTHS, spec.widths), start=1):
        for i in range(1, depth + 1):
            first = block == 1 and i == 1
            pad = CLASSIC_MARGIN if first and geometry == "classic" else 1
            add(f"conv{block}_{i}", nn.Conv2d(c_in, width, 3, padding=pad))
            if batch_norm:
                add(f"bn{block}_{i}", nn.BatchNorm2d(width))
            add(f"relu{block}_{i}", nn.ReLU(inplace=True))
            c_in = width
        add(f"pool{block}", nn.MaxPool2d(2, stride=2, ceil_mode=True))  # 1/2**block
    k6 = spec.fc6_kernel
    add("fc6", nn.Conv2d(c_in, spec.fc_width, k6, padding=k6 // 2 if geometry == "aligned" else 0))  # 1/32
    add("relu6", nn.ReLU(inplace=True))
    add("drop6", nn.Dropout2d(spec.dropout))
    add("fc7", nn.Conv2d(spec.fc_width, spec.fc_width, 1))  # 1/32
    add("relu7", nn.ReLU(inplace=True))
    add("drop7", nn.Dropout2d(spec.dropout))
    return tuple(names)


def _fuse(up: torch.Tensor, skip: torch.Tensor, off_up: int, off_skip: int) -> torch.Tensor:
    """Sum two score maps of one stride over their common window (Caffe crop + Eltwise sum)."""
    h = min(up.shape[-2] - off_up, skip.shape[-2] - off_skip)
    w = min(up.shape[-1] - off_up, skip.shape[-1] - off_skip)
    assert h > 0 and w > 0, f"empty fuse window: {tuple(up.shape)} vs {tuple(skip.shape)}"
    return up[..., off_up:off_up + h, off_up:off_up + w] + skip[..., off_skip:off_skip + h, off_skip:off_skip + w]


# -- the models ----------------------------------------------------------------------------------
class FCNBase(nn.Module):
    """Trunk + score_fr + skip fusions (coarse to fine) + one final upsampler, cropped to the input."""

    arch_name: ClassVar[str]
    # (trunk tap, its score layer, upsampler applied to the coarser scores before the sum)
    skips: ClassVar[tuple[tuple[str, str, str], ...]] = ()
    final: ClassVar[tuple[str, int]]  # last upsampler and its stride

    def __init__(
        self,
        n_classes: int,
        *,
        preset: str = "compact",
        geometry: Geometry = "aligned",
        input_norm: Literal["none", "imagenet"] = "none",
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}")
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
        if geometry not in GEOMETRIES:
            raise ValueError(f"unknown geometry {geometry!r} (known: {', '.join(GEOMETRIES)})")
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"unknown input_norm {input_norm!r} (known: {', '.join(INPUT_NORMS)})")
        spec = PRESETS[preset]
        self.n_classes = n_classes
        self.input_norm = input_norm
        self._preset, self._geometry, self._batch_norm = preset, geometry, bool(batch_norm)
        self._trunk = _add_trunk(self, spec, geometry, self._batch_norm)
        self.score_fr = nn.Conv2d(spec.fc_width, n_classes, 1)
        tap_width = {"relu1_2": spec.widths[0], "pool1": spec.widths[0], "pool2": spec.widths[1],
                     "pool3": spec.widths[2], "pool4": spec.widths[3]}
        for tap, score, up in self.skips:
            self.add_module(score, nn.Conv2d(tap_width[tap], n_classes, 1))
            self.add_module(up, _upsampler(n_classes, 2, geometry))
        final_name, final_stride = self.final
        self.add_module(final_name, _upsampler(n_classes, final_stride, geometry))
        self._taps = frozenset(tap for tap, _, _ in self.skips)
        self.crop_offsets, self._fuse_offsets = self._crop_geometry()
        self.reset_parameters()

    @property
    def arch(self) -> dict[str, Any]:
        """Everything :func:`fcn_from_arch` needs to rebuild this model (saved with checkpoints)."""
        return {"name": self.arch_name, "n_classes": self.n_classes, "preset": self._preset,
                "geometry": self._geometry, "input_norm": self.input_norm, "batch_norm": self._batch_norm}

    def _crop_geometry(self) -> tuple[dict[str, int], list[tuple[int, int]]]:
        """Crop offsets from layer geometry: {cropped layer: offset} and per-skip (up, skip) offsets."""
        grid, taps, wanted = CoordMap(), {}, {tap for tap, _, _ in self.skips}
        for name in self._trunk:
            grid = grid.then(getattr(self, name))
            if name in wanted:
                taps[name] = grid
        grid = grid.then(self.score_fr)  # 1/32
        offsets: dict[str, int] = {}
        fuse: list[tuple[int, int]] = []
        for tap, score, up in self.skips:  # 1/16, then 1/8
            g_up = grid.then(getattr(self, up))
            g_skip = taps[tap].then(getattr(self, score))
            if g_skip.offset >= g_up.offset:  # classic: the skip has the margin, crop it
                offsets[score] = _crop_offset(g_skip, g_up, score)
                fuse.append((0, offsets[score]))
                grid = g_up
            else:
                offsets[up] = _crop_offset(g_up, g_skip, up)
                fuse.append((offsets[up], 0))
                grid = g_skip
        final_name, _ = self.final
        out = grid.then(getattr(self, final_name))  # 1/1
        offsets[final_name] = _crop_offset(out, CoordMap(), final_name)
        if offsets[final_name] < 0:
            raise ValueError(f"{final_name} output starts inside the input (offset {offsets[final_name]})")
        return offsets, fuse

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """He init for the trunk, bilinear upsamplers, small score_fr, zero skip scores (trains from scratch)."""
        for name, layer in self.named_children():
            if isinstance(layer, nn.ConvTranspose2d):
                layer.weight.copy_(bilinear_kernel(self.n_classes, layer.kernel_size[0]))
            elif name == "score_fr":
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.zeros_(layer.bias)
            elif name.startswith("score_"):  # a new skip starts as a no-op: the coarser net's output
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
            elif isinstance(layer, nn.BatchNorm2d):
                layer.reset_parameters()
            elif isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) one-hot die states -> (N, n_classes, H, W) class scores."""
        if x.ndim != 4 or x.shape[1] != IN_CHANNELS:
            raise ValueError(f"expected input (N, {IN_CHANNELS}, H, W), got {tuple(x.shape)}")
        H, W = x.shape[-2:]
        if self.input_norm == "imagenet":
            mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
            std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
            x = (x - mean) / std
        h, taps, wanted = x, {}, self._taps
        for name in self._trunk:
            h = getattr(self, name)(h)
            if name in wanted:  # e.g. pool4 (1/16) and pool3 (1/8) for FCN-8s
                taps[name] = h
        h = self.score_fr(h)  # 1/32
        for (tap, score, up), (off_up, off_skip) in zip(self.skips, self._fuse_offsets):
            h = _fuse(getattr(self, up)(h), getattr(self, score)(taps[tap]), off_up, off_skip)  # 1/16, 1/8
        final_name, _ = self.final
        h = getattr(self, final_name)(h)  # 1/1
        off = self.crop_offsets[final_name]
        assert h.shape[-2] >= off + H and h.shape[-1] >= off + W, (
            f"{final_name} output {tuple(h.shape[-2:])} too small for input {H}x{W} at offset {off}")
        return h[:, :, off:off + H, off:off + W].contiguous()

    def _copy_from(self, coarser: nn.Module) -> None:
        """Copy every parameter the coarser stage has under the same name and shape."""
        own = self.state_dict()
        matching = {k: v for k, v in coarser.state_dict().items() if k in own and own[k].shape == v.shape}
        self.load_state_dict(matching, strict=False)


class FCN32s(FCNBase):
    arch_name = "fcn32s"
    final = ("upscore", 32)


class FCN16s(FCNBase):
    arch_name = "fcn16s"
    skips = (("pool4", "score_pool4", "upscore2"),)
    final = ("upscore16", 16)

    @classmethod
    def from_fcn32s(cls, m32: FCN32s) -> "FCN16s":
        """Staged fine-tuning: a trained FCN-32s's trunk and score_fr; zero score_pool4, bilinear upsamplers."""
        return _staged(cls, m32, FCN32s)


class FCN8s(FCNBase):
    arch_name = "fcn8s"
    skips = (("pool4", "score_pool4", "upscore2"), ("pool3", "score_pool3", "upscore_pool4"))
    final = ("upscore8", 8)

    @classmethod
    def from_fcn16s(cls, m16: FCN16s) -> "FCN8s":
        """Staged fine-tuning: everything of a trained FCN-16s but upscore16; zero score_pool3."""
        return _staged(cls, m16, FCN16s)


# Finer stages: the skip architecture carried on to the die. The paper stopped at FCN-8s because
# returns diminished on 500x500 photos; a wafer map is ~26x26 dies and is labelled die by die, so
# a stride-8 output paints 8x8 blocks of dies with one smooth score, and even the best block-constant
# labelling loses a clear share of mean IU at each block size (the ceilings: docs/models.md).
class FCN4s(FCNBase):
    arch_name = "fcn4s"
    skips = FCN8s.skips + (("pool2", "score_pool2", "upscore_pool3"),)
    final = ("upscore4", 4)


class FCN2s(FCNBase):
    arch_name = "fcn2s"
    skips = FCN4s.skips + (("pool1", "score_pool1", "upscore_pool2"),)
    final = ("upscore2_out", 2)  # not "upscore2": the seed gave that name to the 2x step after score_fr


class FCN1s(FCNBase):
    arch_name = "fcn1s"
    skips = FCN2s.skips + (("relu1_2", "score_conv1_2", "upscore_pool1"),)
    final = ("upscore1", 1)  # nn.Identity: the fused scores already lie on the die grid


MODELS: dict[str, type[FCNBase]] = {
    "fcn32s": FCN32s, "fcn16s": FCN16s, "fcn8s": FCN8s, "fcn4s": FCN4s, "fcn2s": FCN2s, "fcn1s": FCN1s}


def from_coarser(name: str, coarser: FCNBase) -> FCNBase:
    """Staged fine-tuning: model ``name`` with every weight of a trained coarser stage.

    Usually the next-coarser one; a stage may also be skipped (FCN-1s from FCN-8s). Skips the
    coarser model lacks start with zero score layers and bilinear upsamplers, so the new model
    starts out computing what the coarser one did (up to the final upsampling).
    """
    if name not in MODEL_NAMES[1:]:
        raise ValueError(f"{name!r} has no coarser stage to start from (stages: {', '.join(MODEL_NAMES)})")
    coarser_names = MODEL_NAMES[:MODEL_NAMES.index(name)]
    return _staged(MODELS[name], coarser, tuple(MODELS[n] for n in coarser_names))


def _staged(cls: type[FCNBase], coarser: nn.Module, expected: type[FCNBase] | tuple[type[FCNBase], ...]) -> Any:
    if not isinstance(coarser, expected):
        names = ", ".join(c.__name__ for c in (expected if isinstance(expected, tuple) else (expected,)))
        raise TypeError(f"{cls.__name__} is built from a coarser FCN ({names}), got {type(coarser).__name__}")
    model = fcn_from_arch({**coarser.arch, "name": cls.arch_name})
    param = next(coarser.parameters())
    model.to(device=param.device, dtype=param.dtype)
    model._copy_from(coarser)
    return model.train(coarser.training)


def build_fcn(
    name: str,
    *,
    n_classes: int,
    preset: str = "compact",
    geometry: Geometry = "aligned",
    input_norm: Literal["none", "imagenet"] = "none",
    batch_norm: bool = False,
) -> FCNBase:
    """``build_fcn("fcn8s", n_classes=5)`` -> a freshly initialised FCN."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r} (known: {', '.join(MODEL_NAMES)})")
    return MODELS[name](n_classes, preset=preset, geometry=geometry, input_norm=input_norm, batch_norm=batch_norm)


def fcn_from_arch(arch: dict[str, Any]) -> FCNBase:
    """Rebuild a model from its ``.arch`` dict (weights are loaded separately)."""
    known = {"name", "n_classes", "preset", "geometry", "input_norm", "batch_norm"}
    unknown = set(arch) - known
    if unknown or "name" not in arch or "n_classes" not in arch:
        raise ValueError(f"bad arch {arch!r}: needs name and n_classes, may have {sorted(known)}")
    options = {k: v for k, v in arch.items() if k not in ("name", "n_classes")}
    return build_fcn(arch["name"], n_classes=int(arch["n_classes"]), **options)


# -- ImageNet start ------------------------------------------------------------------------------
@torch.no_grad()
def load_vgg16_imagenet(model: FCNBase, path: str | os.PathLike) -> FCNBase:
    """Load a torchvision VGG16 state dict from a local file into a ``vgg16``-preset FCN.

    ``features.*`` convs map to conv1_1 ... conv5_3 in order; ``classifier.0`` / ``classifier.3``
    become fc6 (4096, 512, 7, 7) and fc7 (4096, 4096, 1, 1); the 1000-class layer is dropped. The
    weights expect ImageNet-normalised input, so the model's ``input_norm`` is set to "imagenet"
    (recorded in ``arch``). Never downloads.
    """
    preset = model.arch["preset"]
    if model.arch["batch_norm"]:
        raise ValueError("ImageNet VGG16 weights belong to the plain trunk; build the model with batch_norm=False")
    if preset != "vgg16":
        raise ValueError(f"ImageNet VGG16 weights need preset='vgg16', this model is preset={preset!r}")
    state = torch.load(os.fspath(path), map_location="cpu", weights_only=True, mmap=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    feature_ids = sorted({int(k.split(".")[1]) for k, v in state.items()
                          if k.startswith("features.") and k.endswith(".weight") and v.ndim == 4})
    conv_names = [n for n in model._trunk if n.startswith("conv")]
    if len(feature_ids) != len(conv_names) or "classifier.0.weight" not in state:
        raise ValueError(f"{path}: not a torchvision VGG16 state dict ({len(feature_ids)} feature convs)")
    pairs = [(f"features.{i}", name) for i, name in zip(feature_ids, conv_names)]
    pairs += [("classifier.0", "fc6"), ("classifier.3", "fc7")]
    for src, dst in pairs:
        layer = getattr(model, dst)
        for kind in ("weight", "bias"):
            target = getattr(layer, kind)
            value = state[f"{src}.{kind}"]
            if value.numel() != target.numel():
                raise ValueError(f"{src}.{kind} {tuple(value.shape)} does not fit {dst}.{kind} {tuple(target.shape)}")
            target.copy_(value.reshape(target.shape))  # fc6: (4096, 25088) -> (4096, 512, 7, 7)
    model.input_norm = "imagenet"
    return model


# -- accounting ----------------------------------------------------------------------------------
def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def forward_gflops(model: nn.Module, h: int, w: int) -> float:
    """Forward GFLOPs for one h x w map, counted by ``torch.utils.flop_counter.FlopCounterMode``.

    A multiply-add counts as 2 FLOPs; only the convolutions and transposed convolutions carry FLOPs
    here (ReLU, pooling, crops and sums are not counted). Works on a model built under
    ``torch.device("meta")`` too (shapes only, no arithmetic).
    """
    was_training = model.training
    param = next(model.parameters())
    try:
        model.eval()
        with FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, IN_CHANNELS, h, w, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 1e9
