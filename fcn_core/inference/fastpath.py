"""A faster copy of a network for inference; the network it is made from is left as it is.

- channels-last weights (oneDNN's fast layout for narrow convolutions), with the one-hot input
  built channels-last directly (:func:`one_hot_channels_last`);
- transposed convs computed as conv + pixel shuffle (:class:`SubPixelConvTranspose2d`), which
  CPUs run several times faster than their transposed-conv kernels (docs/performance.md).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from fcn_core.padding import N_DIE_STATES


class SubPixelConvTranspose2d(nn.Module):
    """A ``ConvTranspose2d`` with kernel ``T * stride`` computed as conv2d + pixel_shuffle + crop.

    The same function (equal up to float rounding): output phase (ry, rx) of a stride-s transposed
    conv is a T x T correlation of the input with every s-th kernel tap, so one conv2d with
    ``C_out * s * s`` channels computes all phases and ``pixel_shuffle`` interleaves them. Uses the
    wrapped layer's parameters, so it always computes with its current weights.
    """

    def __init__(self, deconv: nn.ConvTranspose2d) -> None:
        super().__init__()
        if not self.supports(deconv):
            raise ValueError(f"cannot rewrite {deconv} as a sub-pixel convolution")
        self.deconv = deconv

    @staticmethod
    def supports(layer: nn.Module) -> bool:
        if type(layer) is not nn.ConvTranspose2d:
            return False
        (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
        return (kh == kw and sh == sw and ph == pw and kh % sh == 0 and layer.groups == 1
                and tuple(layer.dilation) == (1, 1) and tuple(layer.output_padding) == (0, 0)
                and layer.padding_mode == "zeros")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.deconv
        w = d.weight  # (C_in, C_out, k, k)
        c_in, c_out, k, _ = w.shape
        s, p = d.stride[0], d.padding[0]
        taps = k // s
        # conv weight [(co, ry, rx), ci, by, bx] = w[ci, co, s*(taps-1-by) + ry, s*(taps-1-bx) + rx]
        wc = (w.reshape(c_in, c_out, taps, s, taps, s).flip(2, 4).permute(1, 3, 5, 0, 2, 4)
              .reshape(c_out * s * s, c_in, taps, taps))
        if x.is_contiguous(memory_format=torch.channels_last):
            wc = wc.contiguous(memory_format=torch.channels_last)
        y = F.pixel_shuffle(F.conv2d(x, wc, padding=taps - 1), s)
        h, w_in = x.shape[-2:]
        y = y[..., p:p + s * (h - 1) + k - 2 * p, p:p + s * (w_in - 1) + k - 2 * p]
        return y if d.bias is None else y + d.bias.view(1, -1, 1, 1).to(y.dtype)


def _swap_upsamplers(net: nn.Module) -> nn.Module:
    """Replace ``net``'s top-level transposed convs by sub-pixel ones (on ``net`` itself: a copy)."""
    for name, layer in list(net.named_children()):
        if SubPixelConvTranspose2d.supports(layer):
            setattr(net, name, SubPixelConvTranspose2d(layer))
    return net


def with_subpixel_upsamplers(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose top-level transposed convs run as :class:`SubPixelConvTranspose2d`.

    The copy shares every parameter and buffer with ``model`` (gradients reach its weights, as the
    training benchmark needs) but has its own layers, so ``model`` itself is untouched.
    """
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return _swap_upsamplers(copy.deepcopy(model, shared))


def fast_module(model: nn.Module, *, channels_last: bool = True, subpixel: bool = True) -> nn.Module:
    """A new module for inference that computes ``model``'s function faster; ``model`` is left alone.

    A deep copy in eval mode without gradients, with channels-last weights (``channels_last``)
    and sub-pixel upsamplers (``subpixel``): the same numbers as ``model`` run in that layout.
    """
    with torch.no_grad():
        net = copy.deepcopy(model).eval().requires_grad_(False)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
    return _swap_upsamplers(net) if subpixel else net


def one_hot_channels_last(die: torch.Tensor) -> torch.Tensor:
    """(N, H, W) die states -> float32 (N, 3, H, W) one-hot in channels-last memory, without a copy."""
    states = torch.arange(N_DIE_STATES, device=die.device, dtype=die.dtype)
    return (die.unsqueeze(-1) == states).to(torch.float32).permute(0, 3, 1, 2)
