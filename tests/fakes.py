"""Small stand-ins shared by tests."""

import torch
from torch import nn


class ConstantModel(nn.Module):
    """Predicts one class everywhere: makes the masking rules easy to check."""

    def __init__(self, cls: int, n_classes: int = 5):
        super().__init__()
        self.cls, self.n_classes = cls, n_classes

    def forward(self, x):
        out = torch.zeros(x.shape[0], self.n_classes, *x.shape[-2:])
        out[:, self.cls] = 1.0
        return out
