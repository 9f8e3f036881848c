"""Checkpoints: a model and its config rebuilt from the file alone, safe loading, atomic writes."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from fcn_core.checkpoint import FORMAT_VERSION, load_checkpoint, load_model, model_state, save_checkpoint
from fcn_core.config import load_config
from fcn_core.models import build_fcn


def _state(model: nn.Module, cfg, **extra) -> dict:
    return {"stage": model.arch["name"], "arch": dict(model.arch), "config": cfg.to_dict(),
            "model": model_state(model), "epoch": 3, **extra}


def test_a_model_and_its_config_come_back_from_the_file_alone(tmp_path):
    cfg = load_config("tiny", {"model.batch_norm": True})
    torch.manual_seed(0)
    model = build_fcn("fcn8s", n_classes=cfg.n_classes, preset="compact", geometry="aligned", batch_norm=True)
    with torch.no_grad():  # non-default BatchNorm statistics must travel too
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    path = save_checkpoint(tmp_path / "deep" / "best.pt", _state(model, cfg))  # creates the folders
    loaded, loaded_cfg = load_model(path)
    assert loaded_cfg == cfg and not loaded.training
    x = torch.rand(2, 3, 37, 29)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    raw = load_checkpoint(path)
    assert raw["format_version"] == FORMAT_VERSION and raw["epoch"] == 3


def test_loading_refuses_pickled_code(tmp_path):
    """weights_only loading: a checkpoint carrying an arbitrary object is refused, never executed."""
    path = save_checkpoint(tmp_path / "evil.pt", {"payload": _Arbitrary()})
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(path)


class _Arbitrary:
    pass


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path):
    cfg = load_config("tiny")
    model = build_fcn("fcn32s", n_classes=cfg.n_classes)
    path = save_checkpoint(tmp_path / "last.pt", _state(model, cfg))
    before = path.read_bytes()
    with pytest.raises(Exception):
        save_checkpoint(path, {"unpicklable": lambda: None})  # torch.save fails part-way
    assert path.read_bytes() == before
    assert load_checkpoint(path)["epoch"] == 3


def test_a_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_model_state_unwraps_wrappers_into_a_detached_bare_state():
    model = build_fcn("fcn16s", n_classes=5)
    wrapped = nn.DataParallel(model)  # keys gain a "module." prefix; DDP wraps the same way
    assert all(k.startswith("module.") for k in wrapped.state_dict())
    state = model_state(wrapped)
    assert state.keys() == model.state_dict().keys()
    assert all(not t.requires_grad for t in state.values())
    fresh = build_fcn("fcn16s", n_classes=5)
    fresh.load_state_dict(state)  # strict: the unwrapped names load into a bare model
    assert torch.equal(fresh.score_fr.weight, model.score_fr.weight)
