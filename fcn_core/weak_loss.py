"""Loss for real wafer maps that carry only a wafer-level label (WM-811K, MixedWM38).

A labelled wafer says which patterns are on it, not which fail dies belong to them: random fails
lie under every pattern. So the label is used only for what it does say (``weak_map_loss``):

- **absence, die by die (partial label).** A fail die of a wafer labelled ``{ring}`` is ring or
  background, never scratch, local zone or circle: the loss is ``-log(p_bg + p_ring)``, which
  pushes every unlabelled pattern down and does not choose between the allowed ones. A
  ``None``/``Random`` wafer allows only background, so this is plain cross-entropy to background.
- **presence, per wafer (multiple instance).** Each labelled pattern must be carried by some fail
  dies: the mean probability of that pattern over the wafer's ``top_k`` most likely fail dies is
  pushed towards 1 (``-log``). ``top_k`` = 5 matches the verdict's idea of "a pattern is there".

Which dies form the pattern is left to the die-level skill learnt from synthetic maps, trained
jointly (``fcn_core.train``), so random fails are never taught as a pattern.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from fcn_core.data import WaferSet
from fcn_core.padding import Batch
from fcn_core.table import FAIL
from fcn_core.weak import LineSeed, label_patterns, pseudo_mask, softmax_maps, taught_dies

DEFAULT_TOP_K = 5


def label_sets(patterns: Sequence[set[int]], n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(allowed, present), both (N, n_classes) bool, from each wafer's labelled pattern ids.

    ``allowed`` = background plus the labelled patterns; ``present`` = the labelled patterns only.
    """
    present = torch.zeros(len(patterns), n_classes, dtype=torch.bool)
    for i, ids in enumerate(patterns):
        bad = [k for k in ids if not 0 < k < n_classes]
        if bad:
            raise ValueError(f"wafer {i}: pattern ids {bad} outside 1..{n_classes - 1}")
        present[i, sorted(ids)] = True
    allowed = present.clone()
    allowed[:, 0] = True
    return allowed, present


def weak_map_loss(logits: torch.Tensor, die: torch.Tensor, allowed: torch.Tensor, present: torch.Tensor, *,
                  top_k: int = DEFAULT_TOP_K, presence_weight: float = 1.0) -> torch.Tensor:
    """Partial-label loss on every fail die plus the presence loss of every labelled pattern.

    ``logits`` (N, C, H, W); ``die`` (N, H, W) die states (padding 0); ``allowed``/``present``
    (N, C) bool from :func:`label_sets`. Pass dies and padding take no part. A batch without fail
    dies gives a zero that still joins the graph.
    """
    n, c = logits.shape[:2]
    if die.shape != (n, *logits.shape[2:]) or allowed.shape != (n, c) or present.shape != (n, c):
        raise ValueError(f"shapes differ: logits {tuple(logits.shape)}, die {tuple(die.shape)}, "
                         f"allowed {tuple(allowed.shape)}, present {tuple(present.shape)}")
    if bool((present & ~allowed).any()):
        raise ValueError("a present pattern must also be allowed")
    fail = die == FAIL
    if not bool(fail.any()):
        return logits.sum() * 0.0
    logp = F.log_softmax(logits.float(), dim=1)
    allowed_logp = torch.logsumexp(logp.masked_fill(~allowed[:, :, None, None], -torch.inf), dim=1)  # (N, H, W)
    absence = -allowed_logp[fail].mean()
    if presence_weight == 0 or not bool(present.any()):
        return absence
    probs = logp.exp().masked_fill(~fail[:, None], 0.0).flatten(2)  # (N, C, H*W): fail dies only
    k = min(top_k, probs.shape[-1])
    n_fail = fail.flatten(1).sum(1).clamp(min=1, max=k)  # a wafer with fewer fail dies averages over those
    pooled = probs.topk(k, dim=2).values.sum(2) / n_fail[:, None]  # (N, C)
    carried = present & fail.flatten(1).any(1)[:, None]  # a wafer without fail dies carries no pattern to find
    if not bool(carried.any()):
        return absence
    presence = -torch.log(pooled[carried].clamp_min(1e-6)).mean()
    return absence + presence_weight * presence


@dataclass
class WeakSet:
    """Real maps with their wafer-level label sets, as the joint training step draws them."""

    wafers: WaferSet
    allowed: torch.Tensor  # (N, C) bool: background + labelled patterns
    present: torch.Tensor  # (N, C) bool: labelled patterns

    @classmethod
    def from_table(cls, table: pa.Table, class_names: Sequence[str]) -> "WeakSet":
        """Every row must have a usable ``wafer_label`` (``fcn_core.weak.wafer_label_table`` picks them).

        ``label_map`` null on every row: the wafer labels only (``weak_labels: wafer_labels``). Set on
        every row (pseudo-masks, ``weak_labels: both``): batches carry them as targets too."""
        patterns = label_patterns(table, class_names)
        unusable = [i for i, p in enumerate(patterns) if p is None]
        if unusable:
            raise ValueError(f"{len(unusable)} rows have no usable wafer_label (first: row {unusable[0]})")
        maps = WaferSet.from_table(table)
        n_masked = sum(lab is not None for lab in maps.label)
        if n_masked not in (0, len(maps)):
            raise ValueError(f"{n_masked} of {len(maps)} rows have a label_map: all or none must (pseudo-masks "
                             "for every real map, or wafer labels only)")
        allowed, present = label_sets(patterns, len(class_names))
        return cls(maps, allowed, present)

    @property
    def has_masks(self) -> bool:
        """Whether every map carries a die-level (pseudo-)mask for the batches' ``target``."""
        return bool(len(self)) and self.wafers.label[0] is not None

    def __len__(self) -> int:
        return len(self.wafers)

    def redrawn(self, model: torch.nn.Module, *, min_prob: float, line_seed: LineSeed | None = None,
                device: str | torch.device = "cpu", multiple: int = 32,
                fixed: int | None = None) -> tuple["WeakSet", dict[str, int]]:
        """The same maps and labels with pseudo-masks drawn again from ``model`` (self-training, mid-stage),
        by the rule of ``fcn_core.weak.pseudo_mask``; and the fail dies they teach (``taught_dies``)."""
        if not self.has_masks:
            raise ValueError("this set trains on wafer labels only: there are no pseudo-masks to redraw")
        probs = softmax_maps(model, self.wafers.die, device=device, multiple=multiple, fixed=fixed)
        patterns = [set(torch.nonzero(row).flatten().tolist()) for row in self.present]
        masks = [pseudo_mask(d, p, ids, min_prob=min_prob, line_seed=line_seed)
                 for d, p, ids in zip(self.wafers.die, probs, patterns)]
        wafers = WaferSet(wafer_ids=list(self.wafers.wafer_ids), die=self.wafers.die, label=masks)
        return WeakSet(wafers, self.allowed, self.present), taught_dies(self.wafers.die, masks)

    def endless_batches(self, *, batch_size: int, seed: int, multiple: int = 32, fixed: int | None = None,
                        augment: bool = True) -> Iterator[tuple[Batch, torch.Tensor, torch.Tensor]]:
        """(batch, allowed, present) for ever: shuffled and augmented passes, each seeded from ``seed``,
        so a resumed epoch draws the same real maps as the interrupted one did. ``batch.target``: the
        masks when :attr:`has_masks`, else None."""
        if not len(self):
            raise ValueError("no real maps to train on")
        for n in range(1 << 30):
            for idx, batch in self.wafers.batches(batch_size=batch_size, multiple=multiple, fixed=fixed,
                                                  shuffle=True, seed=seed * 1009 + n, augment=augment,
                                                  with_targets=self.has_masks):
                yield batch, self.allowed[idx], self.present[idx]
