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
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fcn_core.atomic import atomic_write
from fcn_core.config import Config, VerdictConfig, config_from_dict
from fcn_core.inference import packed, products
from fcn_core.inference.fastpath import fast_module
from fcn_core.verdicts import (
    WaferVerdicts,
    calibrate_verdict,
    calibrate_verdict_joint,
    calibrate_verdict_multilabel,
    clear_absent_patterns,
    count_fail_dies,
    follow_patterns,
    kept_classes,
    shaped_maps,
    verdicts_from_counts,
)

if TYPE_CHECKING:
    import pyarrow as pa

BUNDLE_FORMAT = "wafer-fcn-scorer/1"
SCORER_FILE = "scorer.pt"  # a stage's scorer bundle, beside its checkpoints


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
    # fast inference copies of ``model`` by (channels_last, subpixel), made on first use; ``model``
    # itself is never changed, so scorers can be shared between threads
    _nets: dict[tuple[bool, bool], nn.Module] = field(default_factory=dict, init=False, repr=False, compare=False)

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

    @property
    def tta(self) -> str:
        """Test-time augmentation the model is served with (``model.tta`` of its config)."""
        return self.cfg.model.tta

    def with_verdict(self, verdict: VerdictConfig) -> Scorer:
        """The same model judged by other verdict rules (e.g. calibrated thresholds)."""
        judged = replace(self, verdict=verdict)
        judged._nets.update(self._nets)  # same model, same fast copies
        return judged

    def to(self, device: str | torch.device) -> Scorer:
        """This scorer with its model on ``device`` (``nn.Module.to`` moves this scorer's model too)."""
        return replace(self, model=self.model.to(device))

    # -- inference ----------------------------------------------------------------------------
    def inference_net(self, *, channels_last: bool = True, subpixel: bool = True) -> nn.Module:
        """The fast copy of the model that scoring runs (:func:`fast_module`), made once per layout.

        Two threads asking at once may each make one; the first stored is used by all, and the
        copies are only read, so no lock is needed.
        """
        key = (channels_last, subpixel)
        if key not in self._nets:
            self._nets.setdefault(key, fast_module(self.model, channels_last=channels_last, subpixel=subpixel))
        return self._nets[key]

    def predict_packed(self, maps: packed.PackedMaps, *, channels_last: bool = True, subpixel: bool = True,
                       **speed: Any) -> np.ndarray:
        """uint8 network labels laid out like ``maps.data`` (0 off fail dies; no shape rules).

        ``speed``: batch_size, max_batch_pixels, device, bf16, num_threads as
        :func:`fcn_core.inference.packed.label_packed`; padding is the scorer's.
        """
        net = self.inference_net(channels_last=channels_last, subpixel=subpixel)
        return packed.label_packed(net, maps, channels_last=channels_last, multiple=self.pad_multiple,
                                   fixed=self.pad_fixed, tta=self.tta, **speed)

    def predict_maps(self, die_maps: Sequence[np.ndarray], **speed: Any) -> list[np.ndarray]:
        """The network's uint8 label map of each die map, in input order (no shape rules)."""
        maps = packed.pack_maps(die_maps)
        return maps.unpack(self.predict_packed(maps, **speed))

    def shaped_maps(self, pred_maps: Sequence[np.ndarray], die_maps: Sequence[np.ndarray], *,
                    inplace: bool = False, follow: bool = True) -> list[np.ndarray]:
        """The maps after the verdict's shape rules and (``follow``) with the patterns each wafer's
        verdict does not find set to background: what the products show and count. Calibration
        reads them with ``follow=False``: the thresholds it tries decide which patterns stay."""
        shaped = shaped_maps(pred_maps, die_maps, class_names=self.class_names, verdict=self.verdict, inplace=inplace)
        if not follow:
            return shaped
        return follow_patterns(shaped, die_maps, class_names=self.class_names, verdict=self.verdict, inplace=inplace)

    def fail_die_counts(self, pred_maps: Sequence[np.ndarray], die_maps: Sequence[np.ndarray], *,
                        shaped: bool = False) -> np.ndarray:
        """(N, n_classes) fail dies per class after the shape rules (``shaped``: already applied)."""
        maps = pred_maps if shaped else self.shaped_maps(pred_maps, die_maps)
        return count_fail_dies(maps, die_maps, n_classes=self.n_classes)

    def verdicts(self, pred_maps: Sequence[np.ndarray], die_maps: Sequence[np.ndarray], *,
                 shaped: bool = False) -> WaferVerdicts:
        """Per-wafer verdicts of predicted maps (``shaped``: the shape rules are already applied)."""
        dies = self.fail_die_counts(pred_maps, die_maps, shaped=shaped)
        return verdicts_from_counts(dies, class_names=self.class_names, verdict=self.verdict)

    def score_table(self, table: pa.Table, *, model_name: str, model_version: str,
                    extra: dict[str, str] | None = None, **speed: Any) -> pa.Table:
        """The predictions table of a valid wafer table (:mod:`fcn_core.inference.products`).

        ``speed`` as :meth:`predict_packed`. The shape rules edit the flat label buffer through
        per-map views, so ``pred_map`` shows what the ``dies_*`` columns count.
        """
        maps = packed.packed_column(table, "die_map")
        labels = self.predict_packed(maps, **speed)
        if self.verdict.min_elongation_by_class:
            self.shaped_maps(maps.unpack(labels), maps.unpack(), inplace=True, follow=False)
        dies = count_fail_dies(labels, maps.data, n_classes=self.n_classes, sizes=maps.sizes)
        verdicts = verdicts_from_counts(dies, class_names=self.class_names, verdict=self.verdict)
        clear_absent_patterns(labels, kept_classes(dies, class_names=self.class_names, verdict=self.verdict),
                              sizes=maps.sizes)  # pred_map as the dies_* columns count it
        return products.predictions_table(table, maps, labels, verdicts, class_names=self.class_names,
                                          model_name=model_name, model_version=model_version, extra=extra)

    def calibrated(self, die_maps: Sequence[np.ndarray], dataset_labels: Sequence[str | None], *, source: str,
                   multilabel: bool = False, **speed: Any) -> tuple[Scorer, float]:
        """This scorer with verdict thresholds fitted to labelled maps, and their macro-F1 there.

        Thresholds are fitted to what will be counted: the maps after this scorer's shape rules,
        which stay as they are (:func:`fcn_core.verdicts.calibrate_verdict`). ``multilabel``: fit
        the ``patterns`` verdict's multi-label macro-F1 instead (MixedWM38 labels;
        :func:`fcn_core.verdicts.calibrate_verdict_multilabel`). Calibrate on maps the score will
        not be reported on (``fcn_core.real_split``'s calibration part).
        """
        preds = self.shaped_maps(self.predict_maps(die_maps, **speed), die_maps, inplace=True, follow=False)
        fit = calibrate_verdict_multilabel if multilabel else calibrate_verdict
        verdict, f1 = fit(self.fail_die_counts(preds, die_maps, shaped=True), dataset_labels,
                          class_names=self.class_names, source=source,
                          min_elongation_by_class=self.verdict.min_elongation_by_class)
        return self._with_fitted(verdict), f1

    def calibrated_joint(self, single: tuple[Sequence[np.ndarray], Sequence[str | None]],
                         mixed: tuple[Sequence[np.ndarray], Sequence[str | None]], *, source: str,
                         **speed: Any) -> tuple[Scorer, float]:
        """This scorer with thresholds fitted to one-pattern maps (``dominant_pattern``, WM-811K) and
        mixed maps (``patterns``, MixedWM38) at once: (die maps, dataset labels) of each
        (:func:`fcn_core.verdicts.calibrate_verdict_joint`); the objective is the mean macro-F1."""
        counts = []
        for die_maps, _ in (single, mixed):
            preds = self.shaped_maps(self.predict_maps(die_maps, **speed), die_maps, inplace=True, follow=False)
            counts.append(self.fail_die_counts(preds, die_maps, shaped=True))
        verdict, f1 = calibrate_verdict_joint((counts[0], single[1]), (counts[1], mixed[1]),
                                              class_names=self.class_names, source=source,
                                              min_elongation_by_class=self.verdict.min_elongation_by_class)
        return self._with_fitted(verdict), f1

    def _with_fitted(self, fitted: VerdictConfig) -> Scorer:
        """This scorer with fitted thresholds; the rules calibration does not search stay as they were."""
        return self.with_verdict(fitted.model_copy(update={"dies_follow_patterns": self.verdict.dies_follow_patterns,
                                                            "line_rescue": self.verdict.line_rescue}))

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


def scorer_from_checkpoint(path: str | os.PathLike, *, verdict: VerdictConfig | None = None,
                           device: str | torch.device = "cpu") -> Scorer:
    """The scorer of a training checkpoint: its model and config, judged by ``verdict``
    (default: the checkpoint config's own verdict rules)."""
    from fcn_core.checkpoint import load_model  # lazy: the models module is the heavy part

    model, cfg = load_model(path, device=device)
    return Scorer(model=model, verdict=cfg.verdict if verdict is None else verdict, cfg=cfg)


def save_scorer(scorer: Scorer, path: str | os.PathLike) -> Path:
    """Write ``scorer`` as a bundle atomically (a crash mid-write leaves any previous file intact)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        torch.save(scorer.to_bundle(), tmp)
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
