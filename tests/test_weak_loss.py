"""fcn_core.weak_loss: the wafer-level loss on real maps and the real batches it is fed."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fcn_core.config import DEFAULT_CLASSES
from fcn_core.padding import IGNORE_INDEX
from fcn_core.table import FAIL, NO_DIE, PASS, make_table
from fcn_core.weak_loss import WeakSet, label_sets, weak_map_loss

CLASSES = [c.name for c in DEFAULT_CLASSES]  # background, ring, scratch, local zone, circle
C = len(CLASSES)
RING, SCRATCH = 1, 2


def _die_batch(n: int = 2, h: int = 9, w: int = 11, seed: int = 0) -> torch.Tensor:
    """(n, h, w) die states: a padding strip (0) on the right and bottom, off-wafer corners, pass and
    fail dies at random; every wafer has fail dies, pass dies and cells that are no die."""
    rng = np.random.default_rng(seed)
    die = rng.choice([PASS, FAIL], size=(n, h, w), p=[0.6, 0.4]).astype(np.uint8)
    die[:, 0, 0] = die[:, 0, 1] = NO_DIE  # off-wafer
    die[:, -2:, :] = NO_DIE  # padding rows (collate pads with 0 = no die)
    die[:, :, -3:] = NO_DIE  # padding columns
    die[:, 1, 1], die[:, 1, 2] = FAIL, PASS
    return torch.from_numpy(die)


def _grad(logits: torch.Tensor, die: torch.Tensor, patterns: list[set[int]], **kw) -> torch.Tensor:
    allowed, present = label_sets(patterns, C)
    logits = logits.clone().requires_grad_(True)
    weak_map_loss(logits, die, allowed, present, **kw).backward()
    return logits.grad


# -- masking: a die outside the wafer's labelled patterns is never taught as a pattern -------------
@pytest.mark.parametrize("labelled", [{RING}, {RING, SCRATCH}])
@pytest.mark.parametrize("presence_weight", [0.0, 1.0])
def test_unlabelled_patterns_are_pushed_down_on_every_fail_die_and_nothing_else_is_touched(
        labelled: set[int], presence_weight: float) -> None:
    torch.manual_seed(3)
    die = _die_batch(n=2)
    logits = torch.randn(2, C, *die.shape[1:]) * 2
    grad = _grad(logits, die, [labelled, labelled], presence_weight=presence_weight)
    fail = die == FAIL
    unlabelled = [k for k in range(1, C) if k not in labelled]
    for k in unlabelled:
        g = grad[:, k]
        assert (g[fail] > 0).all(), f"class {k}: gradient descent must lower it on every fail die"
    assert (grad.permute(1, 0, 2, 3)[:, ~fail] == 0).all(), "pass dies, off-wafer and padding take no part"
    if presence_weight == 0:  # absence alone never pushes an allowed class down on a fail die
        for k in [0, *labelled]:
            assert (grad[:, k][fail] < 0).all()


def test_a_none_wafer_is_cross_entropy_to_background_over_its_fail_dies() -> None:
    torch.manual_seed(4)
    die = _die_batch(n=3, seed=1)
    logits = torch.randn(3, C, *die.shape[1:]) * 3
    allowed, present = label_sets([set(), set(), set()], C)
    loss = weak_map_loss(logits, die, allowed, present, presence_weight=1.0)
    target = torch.where(die == FAIL, 0, IGNORE_INDEX).long()
    want = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
    assert float(loss) == pytest.approx(float(want), abs=1e-6)


def test_the_absence_term_by_hand() -> None:
    """One fail die, labelled {ring}: -log(p_bg + p_ring) with presence off."""
    die = torch.tensor([[[FAIL, PASS]]], dtype=torch.uint8)
    logits = torch.tensor([[[[0.5, 9.0]], [[1.0, 9.0]], [[2.0, 9.0]], [[-1.0, 9.0]], [[0.0, 9.0]]]])
    allowed, present = label_sets([{RING}], C)
    p = torch.softmax(logits[0, :, 0, 0], dim=0)
    loss = weak_map_loss(logits, die, allowed, present, presence_weight=0.0)
    assert float(loss) == pytest.approx(float(-torch.log(p[0] + p[1])), abs=1e-6)


def test_presence_raises_the_labelled_pattern_on_its_top_k_fail_dies_only() -> None:
    torch.manual_seed(5)
    die = _die_batch(n=1, h=12, w=12, seed=2)
    logits = torch.randn(1, C, 12, 12) * 2
    top_k = 4
    with_presence = _grad(logits, die, [{RING}], top_k=top_k, presence_weight=1.0)
    without = _grad(logits, die, [{RING}], top_k=top_k, presence_weight=0.0)
    presence = (with_presence - without)[0, RING]  # the presence term's own gradient on the ring logit
    fail = die[0] == FAIL
    p_ring = torch.softmax(logits, dim=1)[0, RING].masked_fill(~fail, -1.0)
    top = torch.zeros(fail.numel(), dtype=torch.bool)
    top[p_ring.flatten().topk(top_k).indices] = True
    top = top.view(fail.shape)
    assert int(fail.sum()) > top_k
    assert (presence[top] < 0).all(), "the top-k ring dies are pushed towards ring"
    assert (presence[~top] == 0).all(), "no other die takes part in the presence term"
    assert (with_presence[0, RING][top] < 0).all()


def test_a_wafer_with_fewer_fail_dies_than_top_k_averages_over_those() -> None:
    die = torch.full((1, 4, 4), PASS, dtype=torch.uint8)
    die[0, 1, 1] = die[0, 2, 3] = FAIL
    torch.manual_seed(6)
    logits = torch.randn(1, C, 4, 4)
    allowed, present = label_sets([{SCRATCH}], C)
    loss = weak_map_loss(logits, die, allowed, present, top_k=5, presence_weight=0.5)
    p = torch.softmax(logits, dim=1)[0][:, die[0] == FAIL]  # (C, 2)
    absence = -torch.log(p[0] + p[SCRATCH]).mean()
    presence = -torch.log(p[SCRATCH].mean())  # the mean over the 2 fail dies there are, not over 5
    assert torch.isfinite(loss)
    assert float(loss) == pytest.approx(float(absence + 0.5 * presence), abs=1e-6)


def test_no_fail_dies_gives_a_zero_that_joins_the_graph() -> None:
    die = torch.full((2, 3, 3), PASS, dtype=torch.uint8)
    die[:, 0] = NO_DIE
    logits = torch.randn(2, C, 3, 3, requires_grad=True)
    allowed, present = label_sets([{RING}, set()], C)
    loss = weak_map_loss(logits, die, allowed, present)
    assert loss.detach().item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert logits.grad is not None and (logits.grad == 0).all()


def test_bad_shapes_and_present_but_not_allowed_are_rejected() -> None:
    die = _die_batch(n=2, h=5, w=6)
    logits = torch.randn(2, C, 5, 6)
    allowed, present = label_sets([{RING}, set()], C)
    with pytest.raises(ValueError, match="shapes differ"):
        weak_map_loss(logits, die[:, :4], allowed, present)
    with pytest.raises(ValueError, match="shapes differ"):
        weak_map_loss(logits, die, allowed[:1], present[:1])
    with pytest.raises(ValueError, match="shapes differ"):
        weak_map_loss(logits, die, allowed[:, :3], present)
    not_allowed = allowed.clone()
    not_allowed[0, RING] = False
    with pytest.raises(ValueError, match="present pattern must also be allowed"):
        weak_map_loss(logits, die, not_allowed, present)


# -- label sets ---------------------------------------------------------------------------------------
def test_label_sets_always_allow_background_and_mark_the_labelled_patterns() -> None:
    allowed, present = label_sets([set(), {RING}, {SCRATCH, 4}], C)
    assert allowed.dtype == present.dtype == torch.bool and allowed.shape == present.shape == (3, C)
    assert allowed[:, 0].all() and not present[:, 0].any()
    assert present.tolist() == [[False] * 5, [False, True, False, False, False], [False, False, True, False, True]]
    assert (allowed == present | torch.tensor([True, False, False, False, False])).all()


@pytest.mark.parametrize("bad", [0, C, -1, 17])
def test_label_sets_reject_ids_outside_the_pattern_range(bad: int) -> None:
    with pytest.raises(ValueError, match=r"wafer 1: pattern ids .* outside 1\.\.4"):
        label_sets([{RING}, {bad}], C)


# -- WeakSet ---------------------------------------------------------------------------------------------
LABELS = ["Edge-Ring", "Scratch", "None", "Center+Scratch", "Loc", "Random", "Donut+Edge-Ring"]
PATTERNS = [{RING}, {SCRATCH}, set(), {SCRATCH, 4}, {3}, set(), {RING}]


def _die(fails: int, shape: tuple[int, int] = (5, 6)) -> np.ndarray:
    die = np.full(shape, PASS, np.uint8)
    die[0, 0] = NO_DIE
    die.flat[1:1 + fails] = FAIL
    return die


def _weak_table(labels: list[str | None]):
    # wafer i has i + 1 fail dies: a flip or rotation keeps the count, so a batch row names its wafer
    shapes = [(5, 6), (6, 5), (7, 7)]
    return make_table(wafer_ids=[f"w{i}" for i in range(len(labels))],
                      die_maps=[_die(i + 1, shapes[i % 3]) for i in range(len(labels))], wafer_labels=labels)


def test_weak_set_needs_a_usable_label_on_every_row() -> None:
    with pytest.raises(ValueError, match="1 rows have no usable wafer_label"):
        WeakSet.from_table(_weak_table(["Edge-Ring", "Near-full", "Scratch"]), CLASSES)
    with pytest.raises(ValueError, match="2 rows have no usable wafer_label .first: row 0"):
        WeakSet.from_table(_weak_table([None, "Scratch", ""]), CLASSES)


def test_weak_set_rows_carry_their_wafer_labels() -> None:
    ws = WeakSet.from_table(_weak_table(LABELS), CLASSES)
    assert len(ws) == len(LABELS) and ws.wafers.wafer_ids == [f"w{i}" for i in range(len(LABELS))]
    want_allowed, want_present = label_sets(PATTERNS, C)
    assert torch.equal(ws.allowed, want_allowed) and torch.equal(ws.present, want_present)


def test_endless_batches_keep_going_are_seeded_and_match_their_wafers() -> None:
    ws = WeakSet.from_table(_weak_table(LABELS), CLASSES)
    batch_size = 3
    one_pass = len(list(ws.wafers.batches(batch_size=batch_size, multiple=8)))
    draws = list(itertools.islice(ws.endless_batches(batch_size=batch_size, seed=11, multiple=8), 3 * one_pass))
    assert len(draws) == 3 * one_pass  # more than one pass holds
    seen = []
    want_allowed, want_present = label_sets(PATTERNS, C)
    for batch, allowed, present in draws:
        assert batch.target is None and allowed.shape == present.shape == (len(batch.sizes), C)
        assert batch.x.shape[-2] % 8 == 0 and batch.x.shape[-1] % 8 == 0
        for j in range(len(batch.sizes)):
            wafer = int((batch.die[j] == FAIL).sum()) - 1  # wafer i has i + 1 fail dies
            seen.append(wafer)
            assert torch.equal(allowed[j], want_allowed[wafer]) and torch.equal(present[j], want_present[wafer])
    assert sorted(set(seen)) == list(range(len(LABELS)))

    again = list(itertools.islice(ws.endless_batches(batch_size=batch_size, seed=11, multiple=8), 3 * one_pass))
    for (a, aa, ap), (b, ba, bp) in zip(draws, again):
        assert torch.equal(a.x, b.x) and torch.equal(aa, ba) and torch.equal(ap, bp)
    other = list(itertools.islice(ws.endless_batches(batch_size=batch_size, seed=12, multiple=8), 3 * one_pass))
    assert any(a.x.shape != b.x.shape or not torch.equal(a.x, b.x) for (a, _, _), (b, _, _) in zip(draws, other))
    # every pass holds every wafer once, and the passes are not one order repeated (each has its own seed)
    orders = [[int((b.die[j] == FAIL).sum()) - 1 for b, _, _ in draws[i * one_pass:(i + 1) * one_pass]
               for j in range(len(b.sizes))] for i in range(3)]
    assert all(sorted(o) == list(range(len(LABELS))) for o in orders)
    assert len({tuple(o) for o in orders}) > 1


def _masked_table(labels: list[str], masked: list[bool]):
    """``_weak_table`` with a pseudo-mask on the rows ``masked`` says: on wafer i, fail dies taught its
    first labelled pattern (background for None/Random), the last fail die ignored."""
    from fcn_core.weak import IGNORE_LABEL

    table = _weak_table(labels)
    masks = []
    for i, (die, pats, has) in enumerate(zip(_die_maps(table), PATTERNS, masked)):
        mask = np.where(die == FAIL, min(pats, default=0), 0).astype(np.uint8)
        mask.flat[i + 1] = IGNORE_LABEL  # _die(i + 1): fail dies sit at flat 1 .. i + 1
        masks.append(mask if has else None)
    return make_table(wafer_ids=table.column("wafer_id").to_pylist(), die_maps=_die_maps(table), label_maps=masks,
                      wafer_labels=labels)


def _die_maps(table):
    from fcn_core.table import die_maps

    return die_maps(table)


def test_a_weak_set_with_pseudo_masks_carries_them_as_targets_on_fail_dies_only() -> None:
    ws = WeakSet.from_table(_masked_table(LABELS, [True] * len(LABELS)), CLASSES)
    assert ws.has_masks and not WeakSet.from_table(_weak_table(LABELS), CLASSES).has_masks
    seen = set()
    for batch, allowed, present in itertools.islice(ws.endless_batches(batch_size=3, seed=0, multiple=8,
                                                                       augment=False), 3):
        assert batch.target is not None and batch.target.shape == batch.die.shape
        for j in range(len(batch.sizes)):
            wafer = int((batch.die[j] == FAIL).sum()) - 1
            seen.add(wafer)
            fail = batch.die[j] == FAIL
            taught = batch.target[j][fail]
            assert (batch.target[j][~fail] == IGNORE_INDEX).all()  # pass dies, no die, padding: never taught
            assert int((taught == IGNORE_INDEX).sum()) == 1  # the one uncertain die
            assert set(taught[taught != IGNORE_INDEX].tolist()) <= {min(PATTERNS[wafer], default=0)}
            assert bool(allowed[j, taught[taught != IGNORE_INDEX]].all())  # masks stay inside the label
    assert seen == set(range(len(LABELS)))


def test_a_weak_set_refuses_pseudo_masks_on_some_rows_only() -> None:
    with pytest.raises(ValueError, match="2 of 7 rows have a label_map: all or none"):
        WeakSet.from_table(_masked_table(LABELS, [True, False, True, False, False, False, False]), CLASSES)


def test_an_empty_weak_set_says_so() -> None:
    ws = WeakSet.from_table(_weak_table(["Scratch"]).slice(0, 0), CLASSES)
    with pytest.raises(ValueError, match="no real maps"):
        next(ws.endless_batches(batch_size=2, seed=0))


def test_a_labelled_wafer_without_fail_dies_adds_no_presence_term():
    """Its pooled probability would be 0 (clamped): a huge constant that dilutes the others' gradient."""
    die = torch.full((2, 4, 4), 1, dtype=torch.uint8)
    die[0, 1, 1] = FAIL
    logits = torch.zeros(2, 5, 4, 4)
    allowed, present = label_sets([{1}, {2}], 5)
    both = weak_map_loss(logits, die, allowed, present)
    alone = weak_map_loss(logits[:1], die[:1], allowed[:1], present[:1])
    assert torch.allclose(both, alone)


class _SaysScratch(torch.nn.Module):
    """A 'model' whose logits say scratch on every position, strongly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], C, *x.shape[2:])
        logits[:, CLASSES.index("scratch")] = 10.0
        return logits


def test_redrawn_masks_come_from_the_given_model_by_the_pseudo_mask_rule() -> None:
    from fcn_core.weak import IGNORE_LABEL, pseudo_mask, softmax_maps

    ws = WeakSet.from_table(_masked_table(LABELS, [True] * len(LABELS)), CLASSES)
    again, taught = ws.redrawn(_SaysScratch(), min_prob=0.6, multiple=8)
    assert again.has_masks and again.wafers.wafer_ids == ws.wafers.wafer_ids and again.wafers.die is ws.wafers.die
    assert torch.equal(again.allowed, ws.allowed) and torch.equal(again.present, ws.present)
    scratch = CLASSES.index("scratch")
    probs = softmax_maps(_SaysScratch(), ws.wafers.die, multiple=8)
    for die, mask, pats, p in zip(ws.wafers.die, again.wafers.label, PATTERNS, probs):
        assert np.array_equal(mask, pseudo_mask(die, p, pats, min_prob=0.6))
        fail = mask[die == FAIL]
        want = 0 if not pats else scratch if scratch in pats else IGNORE_LABEL  # never outside the label
        assert (fail == want).all()
    n_fail = sum(int((d == FAIL).sum()) for d in ws.wafers.die)
    assert sum(taught.values()) == n_fail and taught["pattern"] == sum(
        int((d == FAIL).sum()) for d, pats in zip(ws.wafers.die, PATTERNS) if scratch in pats)
    # the first masks are untouched (the set is redrawn into a new one)
    assert all(int((m == IGNORE_LABEL).sum()) == 1 for m in ws.wafers.label)


def test_a_weak_set_without_masks_has_none_to_redraw() -> None:
    with pytest.raises(ValueError, match="no pseudo-masks to redraw"):
        WeakSet.from_table(_weak_table(LABELS), CLASSES).redrawn(_SaysScratch(), min_prob=0.6)
