"""The peer measured side by side: torchvision's FCN-ResNet50, random init, 5 classes.

Its first conv takes 3 channels, so the same one-hot die input feeds both networks. Nothing is
downloaded (``weights=None, weights_backbone=None``).
"""

from __future__ import annotations

import torch
from torch import nn

PEER_NAME = "torchvision fcn_resnet50 (random init)"


class PeerFCN(nn.Module):
    """``fcn_resnet50`` returning the ``out`` logits tensor, like the project's FCNs."""

    def __init__(self, n_classes: int = 5) -> None:
        super().__init__()
        from torchvision.models.segmentation import fcn_resnet50

        self.net = fcn_resnet50(weights=None, weights_backbone=None, num_classes=n_classes, aux_loss=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)["out"]


def peer_gflops(h: int, w: int) -> float:
    """Forward GFLOPs (2 x multiply-accumulates of its convolutions) of the peer for one h x w input."""
    from fcn_core.models import forward_gflops

    return forward_gflops(PeerFCN(), h, w)
