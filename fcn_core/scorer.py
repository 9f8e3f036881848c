"""The served unit: a network plus everything needed to judge wafers with it.

A :class:`Scorer` is what evaluation, verdict calibration, ``wafer-fcn predict`` and the nightly
flow run. It holds the model, the verdict rules it is judged with (calibrated thresholds and
shape rules), the padding it was trained with and the class names, so nothing rides on the
``nn.Module`` as an attribute and every consumer judges a wafer the same way.

On disk (a checkpoint beside training, an MLflow model artifact in the registry) a scorer is a
*bundle*: plain tensors and JSON-able values that load with ``torch.load(weights_only=True)``:

    {"format": "wafer-fcn-scorer/1", "arch": {...}, "state_dict": {...}, "verdict": {...},
     "pad_multiple": 32, "pad_fixed": None, "class_names": [...], "config": {...}}

Loading never unpickles code; anything that is not such a bundle is refused with one line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fcn_core.config import Config, VerdictConfig, config_from_dict

BUNDLE_FORMAT = "wafer-fcn-scorer/1"


class NotAScorerError(ValueError):
    """A file or object that is not a weights-only wafer-fcn scorer bundle."""


@dataclass(frozen=True)
class Scorer:
    """A model and the rules its segmentations are judged by.

    ``cfg`` is the full config the model was trained with (kept for provenance and for the
    options the scoring functions read); ``verdict`` may differ from ``cfg.verdict`` once
    thresholds are calibrated on real maps.
    """

    model: nn.Module
    verdict: VerdictConfig
    cfg: Config

    @property
    def class_names(self) -> list[str]:
        return self.cfg.class_names

    @property
    def n_classes(self) -> int:
        return self.cfg.n_classes

    @property
    def pad_multiple(self) -> int:
        return self.cfg.data.pad_multiple

    @property
    def pad_fixed(self) -> int | None:
        return self.cfg.data.pad_fixed

    def with_verdict(self, verdict: VerdictConfig) -> Scorer:
        """The same model judged by other verdict rules (e.g. calibrated thresholds)."""
        return replace(self, verdict=verdict)

    def to(self, device: str | torch.device) -> Scorer:
        return replace(self, model=self.model.to(device))

    # -- bundles ------------------------------------------------------------------------------
    def to_bundle(self) -> dict[str, Any]:
        """Weights-only-safe dict: tensors and JSON-able values only."""
        model = getattr(self.model, "module", self.model)  # DDP
        model = getattr(model, "_orig_mod", model)  # torch.compile
        arch = getattr(model, "arch", None)
        if not isinstance(arch, dict):
            raise NotAScorerError(f"{type(model).__name__} has no architecture metadata (model.arch)")
        return {
            "format": BUNDLE_FORMAT,
            "arch": dict(arch),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "verdict": self.verdict.model_dump(mode="json"),
            "pad_multiple": self.pad_multiple,
            "pad_fixed": self.pad_fixed,
            "class_names": list(self.class_names),
            "config": self.cfg.to_dict(),
        }

    @classmethod
    def from_bundle(cls, bundle: Any, *, device: str | torch.device = "cpu", source: str = "bundle") -> Scorer:
        """Rebuild a scorer from :meth:`to_bundle`'s dict; refuses anything else (``source`` names it)."""
        from fcn_core.models import fcn_from_arch  # lazy: the models module is the heavy part

        if not isinstance(bundle, dict) or bundle.get("format") != BUNDLE_FORMAT:
            found = bundle.get("format") if isinstance(bundle, dict) else type(bundle).__name__
            raise NotAScorerError(f"{source}: not a wafer-fcn scorer bundle (format {found!r}, "
                                  f"expected {BUNDLE_FORMAT!r})")
        try:
            cfg = config_from_dict(bundle["config"])
            verdict = VerdictConfig.model_validate(bundle["verdict"])
            model = fcn_from_arch(bundle["arch"])
            model.load_state_dict(bundle["state_dict"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise NotAScorerError(f"{source}: broken scorer bundle: {type(exc).__name__}: {exc}") from exc
        return cls(model=model.to(device).eval(), verdict=verdict, cfg=cfg)


def save_scorer(scorer: Scorer, path: str | os.PathLike) -> Path:
    """Write ``scorer`` as a bundle atomically (a crash mid-write leaves any previous file intact)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(scorer.to_bundle(), tmp)
    os.replace(tmp, path)
    return path


def load_scorer(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> Scorer:
    """Load a bundle with ``weights_only=True``: a pickle that would run code is refused, never run."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scorer file {path} does not exist")
    try:
        bundle = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, zip errors, truncated files: all one answer
        raise NotAScorerError(f"{path}: not a weights-only wafer-fcn scorer file ({type(exc).__name__})") from exc
    return Scorer.from_bundle(bundle, device=device, source=str(path))
