"""Where and how inference runs: device, intra-op threads, bf16 autocast, class ids from logits.

The reasons behind each default are measured in docs/performance.md.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from fcn_core.padding import Batch
from fcn_core.table import FAIL


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_for(device: torch.device, *, bf16: bool | None = None):
    """bf16 autocast on CUDA by default; on CPU only when asked (see docs/performance.md)."""
    use = (device.type == "cuda") if bf16 is None else bf16
    if not use:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@contextlib.contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, then restore the previous count (None: as is).

    On a shared or oversubscribed CPU, threads > 1 can be many times slower than 1: every operator
    ends in a barrier that waits for a descheduled thread (docs/performance.md).
    """
    if n is None:
        yield
        return
    if n < 1:
        raise ValueError(f"num_threads must be >= 1, got {n}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def class_ids(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(1)`` (first maximum on ties), computed as ``max(1).indices``.

    Same answer; on CPU argmax over the channel dim of an NCHW tensor takes a strided slow path,
    several times slower than max (docs/performance.md).
    """
    return logits.max(1).indices


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 in hardware (AVX512-BF16 or AMX-BF16; read from /proc/cpuinfo).

    Without it oneDNN emulates bf16 and autocast is slower than fp32.
    """
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def inference_bf16(device: torch.device, bf16: bool | None) -> bool:
    """Scoring's bf16 choice: as asked, else on CUDA and on CPUs with native bf16.

    Faster scoring with nearly all fail-die labels unchanged (docs/performance.md).
    """
    if bf16 is not None:
        return bf16
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())


def mirror_maps(t: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Each map of ``t`` (N, ..., H, W) mirrored left-right within its own (h, w) corner; the padding
    stays at the bottom/right, where the network saw it in training. Its own inverse."""
    out = t.clone()
    for k, (h, w) in enumerate(sizes):
        out[k, ..., :h, :w] = t[k, ..., :h, :w].flip(-1)
    return out


def tta_scores(net: nn.Module, x: torch.Tensor, sizes: Sequence[tuple[int, int]], tta: str) -> torch.Tensor:
    """Class scores of a padded one-hot batch: the logits (``tta`` none), or for ``mirror`` the sum of
    the softmax of each map and the mirrored-back softmax of its mirror image (argmax = the average's)."""
    logits = net(x)
    if tta == "none":
        return logits
    if tta != "mirror":
        raise ValueError(f"unknown test-time augmentation {tta!r} (none, mirror)")
    mirrored = net(mirror_maps(x, sizes))
    return torch.softmax(logits.float(), 1) + mirror_maps(torch.softmax(mirrored.float(), 1), sizes)


def batch_labels(model: nn.Module, batch: Batch, device: torch.device, *, bf16: bool | None = None,
                 tta: str = "none") -> torch.Tensor:
    """(N, H, W) int64 labels on ``device`` for a padded batch, background off fail dies."""
    x = batch.x.to(device, non_blocking=True)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast_for(device, bf16=bf16):
        logits = tta_scores(model, x, batch.sizes, tta)
    labels = class_ids(logits)
    die = torch.as_tensor(batch.die).to(device, non_blocking=True)
    return labels.masked_fill_(die != FAIL, 0)
