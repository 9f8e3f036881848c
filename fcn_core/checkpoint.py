"""Checkpoints that load with ``torch.load(weights_only=True)``.

A checkpoint holds only tensors and plain Python values: the model and optimiser state dicts,
the epoch, RNG states, the training history and the full config as a dict (nanoGPT-style), so
a model can be rebuilt from the file alone.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fcn_core.atomic import atomic_write
from fcn_core.config import Config, config_from_dict
from fcn_core.models import fcn_from_arch

FORMAT_VERSION = 1


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        torch.save({"format_version": FORMAT_VERSION, **state}, tmp)
    return path


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return torch.load(path, map_location=map_location, weights_only=True)


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of the bare model (unwraps DDP and torch.compile wrappers)."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> tuple[nn.Module, Config]:
    """Rebuild the model and its config from a checkpoint, in eval mode.

    The verdict rules a model is judged by travel with it in a :class:`fcn_core.scorer.Scorer`,
    not on the module (``fcn_core.scorer.scorer_from_checkpoint``).
    """
    ckpt = load_checkpoint(path)
    model = fcn_from_arch(ckpt["arch"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), config_from_dict(ckpt["config"])
