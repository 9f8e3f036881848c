"""The synthetic wafer generator: contract, determinism, label rules, geometry, size mix."""

from __future__ import annotations

import re
from datetime import date, timedelta

import numpy as np
import pyarrow as pa
import pytest

from fcn_core.config import DEFAULT_CLASSES, ClassSpec, Config, SynthConfig
from fcn_core.synth import NONE_LABEL, PATTERN_KINDS, generate_wafers, iter_wafer_chunks, pattern_ids
from fcn_core.table import FAIL, NO_DIE, PASS, WAFER_SCHEMA, concat, die_maps, label_maps

ONLY_PATTERNS = {"pattern_free_fraction": 0.0}


@pytest.fixture(scope="module")
def mix() -> pa.Table:
    """The default mix, 600 wafers in 24 lots: shared by the read-only checks below."""
    return generate_wafers(600, seed=7)


def names_in(label: np.ndarray) -> set[str]:
    by_id = {c.id: c.name for c in Config().classes}
    return {by_id[int(i)] for i in np.unique(label) if i != 0}


# -- contract --------------------------------------------------------------------------------------
def test_table_conforms_to_the_wafer_schema(mix):
    assert mix.schema.equals(WAFER_SCHEMA)
    assert mix.num_rows == 600
    for col in WAFER_SCHEMA.names:
        assert mix.column(col).null_count == 0, col
    heights, widths = mix.column("height").to_numpy(), mix.column("width").to_numpy()
    sizes = [len(b) for b in mix.column("die_map").to_pylist()]
    assert sizes == list(heights * widths)
    assert [len(b) for b in mix.column("label_map").to_pylist()] == sizes
    n_classes = Config().n_classes
    for die, label in zip(die_maps(mix), label_maps(mix)):
        assert set(np.unique(die)) <= {NO_DIE, PASS, FAIL}
        assert label.max() < n_classes


def test_ids_lots_and_capture_times(mix):
    ids = mix.column("wafer_id").to_pylist()
    assert ids[0] == "syn-7-0000000" and ids[-1] == "syn-7-0000599"
    assert len(set(ids)) == len(ids)
    lots = mix.column("lot_id").to_pylist()
    _, counts = np.unique(lots, return_counts=True)
    assert len(counts) == 24 and set(counts) == {25}  # fab-sized lots
    assert all(re.fullmatch(r"syn-7-lot\d{6}", lot) for lot in lots)
    # a lot is one product: one grid size for all its wafers
    sizes = {}
    for lot, h, w in zip(lots, mix.column("height").to_pylist(), mix.column("width").to_pylist()):
        assert sizes.setdefault(lot, (h, w)) == (h, w)


def test_captures_spread_over_the_configured_nights():
    t = generate_wafers(500, seed=1, synth=SynthConfig(nights=3), start_date=date(2026, 3, 1))
    days = {ts.date() for ts in t.column("captured_at").to_pylist()}
    assert days == {date(2026, 3, 1) + timedelta(days=k) for k in range(3)}
    assert all(ts.tzinfo is not None for ts in t.column("captured_at").to_pylist()[:5])


def test_generated_tables_pass_validation(mix):
    validate = pytest.importorskip("fcn_core.validate")
    checked = validate.validate_table(mix, n_classes=Config().n_classes)
    assert checked.counts == {} and checked.valid.num_rows == mix.num_rows


# -- determinism -----------------------------------------------------------------------------------
def test_same_seed_same_wafers_and_pieces_equal_the_whole():
    whole = generate_wafers(1000, seed=3)
    halves = concat([generate_wafers(500, seed=3), generate_wafers(500, seed=3, start_index=500)])
    assert halves.equals(whole)
    chunks = list(iter_wafer_chunks(1000, 300, seed=3))
    assert [c.num_rows for c in chunks] == [300, 300, 300, 100]
    assert concat(chunks).equals(whole)
    assert generate_wafers(1000, seed=3).equals(whole)
    other = generate_wafers(50, seed=4)
    assert other.column("die_map").to_pylist() != whole.column("die_map").to_pylist()[:50]


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="seed"):
        generate_wafers(3, seed=-1)
    with pytest.raises(ValueError, match="chunk_size"):
        next(iter_wafer_chunks(3, 0, seed=1))
    with pytest.raises(ValueError, match="unknown pattern names"):
        generate_wafers(3, seed=1, synth=SynthConfig(pattern_weights={"rings": 1.0}))
    with pytest.raises(ValueError, match="size_min"):
        SynthConfig(size_min=50, size_max=40)


# -- label rules -----------------------------------------------------------------------------------
def test_labels_only_on_fail_dies_and_match_the_wafer_label(mix):
    background_fails_on_patterned = 0
    for die, label, name in zip(die_maps(mix), label_maps(mix), mix.column("wafer_label").to_pylist()):
        assert not (label[die != FAIL] != 0).any(), "a label off a fail die"
        present = names_in(label)
        if name == NONE_LABEL:
            assert not label.any()
        else:
            # fixed order: class id order, joined with '+'
            assert name == "+".join(n for n in Config().class_names if n in present)
            background_fails_on_patterned += int(((die == FAIL) & (label == 0)).sum())
    assert background_fails_on_patterned > 0  # random background fails keep label 0


def test_pattern_free_wafers_carry_no_labels_but_may_fail():
    t = generate_wafers(200, seed=2, synth=SynthConfig(pattern_free_fraction=1.0, random_fraction=0.3,
                                                       near_full_fraction=0.2, wafers_per_lot=5))
    assert set(t.column("wafer_label").to_pylist()) == {NONE_LABEL}
    assert all(not lab.any() for lab in label_maps(t))
    density = np.array([(d == FAIL).sum() / (d > 0).sum() for d in die_maps(t)])
    assert density.max() > 0.7  # near-full wafers are there, unlabelled
    assert np.median(density) < 0.3


def test_every_pattern_class_appears_in_a_few_hundred_wafers(mix):
    counts = {name: 0 for name in PATTERN_KINDS}
    for label in label_maps(mix):
        for name in names_in(label):
            counts[name] += 1
    assert all(c >= 60 for c in counts.values()), counts
    labels = mix.column("wafer_label").to_pylist()
    assert 0.2 < labels.count(NONE_LABEL) / len(labels) < 0.4  # pattern_free_fraction 0.3
    assert any("+" in x for x in labels)  # mixed wafers


@pytest.mark.parametrize("kind", PATTERN_KINDS)
def test_each_pattern_alone(kind):
    weights = {k: float(k == kind) for k in PATTERN_KINDS}
    t = generate_wafers(60, seed=5, synth=SynthConfig(**ONLY_PATTERNS, mixed_fraction=0.0,
                                                      pattern_weights=weights, wafers_per_lot=3))
    labels = t.column("wafer_label").to_pylist()
    assert labels.count(kind) >= 57, labels  # a pattern may very rarely land on no die at all
    assert set(labels) <= {kind, NONE_LABEL}


def test_ids_come_from_the_configured_classes():
    shuffled = [DEFAULT_CLASSES[0]] + [ClassSpec(id=i + 1, name=n, color="#000000")
                                       for i, n in enumerate(["circle", "local zone", "scratch", "ring"])]
    ids = pattern_ids(shuffled)
    assert ids == {"circle": 1, "local zone": 2, "scratch": 3, "ring": 4}
    synth = SynthConfig(**ONLY_PATTERNS, mixed_fraction=0.0, pattern_weights={"ring": 1.0}, wafers_per_lot=5)
    t = generate_wafers(20, seed=1, synth=synth, classes=shuffled)
    assert {int(v) for lab in label_maps(t) for v in np.unique(lab)} <= {0, 4}
    assert set(t.column("wafer_label").to_pylist()) <= {"ring", NONE_LABEL}
    with pytest.raises(ValueError, match="classes named"):
        pattern_ids(DEFAULT_CLASSES[:3])


def test_overlapping_patterns_give_each_die_one_label():
    synth = SynthConfig(**ONLY_PATTERNS, mixed_fraction=1.0, wafers_per_lot=5)
    t = generate_wafers(120, seed=8, synth=synth)
    multi = [x for x in t.column("wafer_label").to_pylist() if "+" in x]
    assert len(multi) >= 100  # some mixed draws may lose a pattern entirely under another one
    # each wafer_label lists the classes in the label map (checked above); here: order is by id
    order = {n: i for i, n in enumerate(Config().class_names)}
    for x in multi:
        parts = x.split("+")
        assert parts == sorted(parts, key=order.__getitem__)


# -- geometry and sizes ----------------------------------------------------------------------------
def test_dies_lie_on_a_round_wafer_filling_the_grid(mix):
    for die in die_maps(mix):
        h, w = die.shape
        rows, cols = np.nonzero(die != NO_DIE)
        # inside the grid's inscribed ellipse (up to the centre jitter of 0.3 die)
        v = (rows - (h - 1) / 2) / (h / 2 * 1.005 + 0.3)
        u = (cols - (w - 1) / 2) / (w / 2 * 1.005 + 0.3)
        assert (u**2 + v**2 <= 1).all()
        on = die != NO_DIE
        assert on[0].any() and on[:, 0].any() and on[:, -1].any()  # touches top, left, right
        assert not on[0, 0] and not on[-1, -1]  # corners are off-wafer
        assert 0.7 < on.mean() < 0.8  # ~pi/4 of the grid, less flats, notches, test sites
        # off-wafer holes only as test sites: most rows are one unbroken run of dies
        runs = np.abs(np.diff(on.astype(np.int8), axis=1)).sum(axis=1)
        assert (runs <= 2).mean() > 0.8


def test_size_mix_resembles_wm811k(mix):
    t = generate_wafers(2000, seed=11, synth=SynthConfig(wafers_per_lot=5))  # 400 products
    h, w = t.column("height").to_numpy(), t.column("width").to_numpy()
    side = np.sqrt(h * w)
    assert 24 <= np.median(side) <= 32  # real: 26
    assert 0.3 < (h != w).mean() < 0.95  # real: 0.82 non-square
    assert 35 <= np.percentile(side, 75) <= 50  # real: 41
    assert np.max(np.maximum(h, w)) > 90  # a long tail
    assert h.min() >= 16 and w.min() >= 16 and max(h.max(), w.max()) <= 256
    fixed = generate_wafers(30, seed=1, synth=SynthConfig(size_min=32, size_max=32, wafers_per_lot=3))
    assert set(fixed.column("height").to_pylist()) == {32} == set(fixed.column("width").to_pylist())


def test_background_fail_density_resembles_wm811k():
    t = generate_wafers(400, seed=4, synth=SynthConfig(pattern_free_fraction=1.0, random_fraction=0.0,
                                                       near_full_fraction=0.0, wafers_per_lot=2))
    dies = np.array([(d > 0).sum() for d in die_maps(t)])
    density = np.array([(d == FAIL).sum() for d in die_maps(t)]) / dies
    small = dies < 600  # real None wafers on ~26 x 26 grids: median 0.17, p5 0.10, p95 0.24
    assert 0.13 < np.median(density[small]) < 0.22
    assert np.median(density[dies > 2000]) < 0.06  # smaller dies fail less (real: 0.02-0.04)


# -- widening towards MixedWM38 (issue #13): each option's property, defaults unchanged ----------------
SIDE_52 = {"size_min": 52, "size_max": 52, "wafers_per_lot": 1}  # MixedWM38's grid
ID = {c.name: c.id for c in DEFAULT_CLASSES}


def only(*kinds: str, **options) -> SynthConfig:
    """52 x 52 wafers drawing exactly ``kinds``, no background fails unless ``options`` say so."""
    base = {**SIDE_52, "pattern_free_fraction": 0.0, "background_rate": 0.0,
            "pattern_weights": {k: float(k in kinds) for k in PATTERN_KINDS}}
    return SynthConfig(**{**base, **options})


def drawn(synth: SynthConfig, n: int = 60, seed: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    table = generate_wafers(n, seed=seed, synth=synth)
    return list(zip(die_maps(table), label_maps(table)))


def layer_from_rim(on: np.ndarray) -> np.ndarray:
    """Taxicab die layer from the rim (1 = outermost), uncapped."""
    layer, cur, k = np.zeros(on.shape, int), on.copy(), 1
    while cur.any():
        p = np.pad(cur, 1)
        inner = cur & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
        layer[cur & ~inner] = k
        cur, k = inner, k + 1
    return layer


def radius(on: np.ndarray) -> np.ndarray:
    """Distance from the wafer's centre in wafer radii."""
    yy, xx = np.mgrid[:on.shape[0], :on.shape[1]]
    return np.hypot(yy - yy[on].mean(), xx - xx[on].mean()) / np.sqrt(on.sum() / np.pi)


def test_the_default_config_draws_the_wafers_it_drew_before_the_options():
    """Digests recorded before the widening options existed: off, they draw no extra random number."""
    import hashlib

    def digest(table: pa.Table) -> str:
        h = hashlib.sha256()
        for name in table.column_names:
            h.update(name.encode())
            h.update(repr(table.column(name).to_pylist()).encode())
        return h.hexdigest()

    assert digest(generate_wafers(300, seed=3)) == "759aa052f50910d9b8869649e36833d2ddd03673b55472c006649bd49b47f718"
    mixed = SynthConfig(pattern_free_fraction=0.0, mixed_fraction=0.6)
    assert digest(generate_wafers(200, seed=4, synth=mixed)) == (
        "fb7101a6f20da0ff10c524f3434c60bfa789098b54d8b315d612de9c3a7f37d9")


def test_heavy_background_fails_at_a_rate_in_the_configured_range():
    synth = only("scratch", background_rate=0.135, pattern_background_fraction=1.0,
                 pattern_background_range=(0.2, 0.3))
    # the fail share of the dies no pattern hit is the random rate (binomial noise ~0.01 on ~2,000 dies)
    shares = [((d == FAIL) & (lab == 0)).sum() / ((d != NO_DIE) & (lab == 0)).sum() for d, lab in drawn(synth)]
    assert 0.16 < min(shares) and max(shares) < 0.34
    assert min(shares) < 0.23 and max(shares) > 0.27  # drawn across the range, not one rate
    today = [((d == FAIL) & (lab == 0)).sum() / ((d != NO_DIE) & (lab == 0)).sum()
             for d, lab in drawn(only("scratch", background_rate=0.135))]
    assert np.median(today) < 0.1


def test_thick_edge_rings_fill_their_radial_width():
    ring = {"ring_donut_fraction": 0.0, "ring_partial_fraction": 0.0}
    thick = only("ring", **ring, ring_thick_fraction=1.0, ring_thick_dies=(3.0, 3.0))

    def profile(synth):  # median share of ring dies in die layers 1..7 from the rim
        return np.median([[np.mean(lab[layer == k] == ID["ring"]) for k in range(1, 8)]
                          for d, lab in drawn(synth) for layer in [layer_from_rim(d != NO_DIE)]], axis=0)

    wide, thin = profile(thick), profile(only("ring", **ring))
    assert (wide[:3] > 0.6).all() and (wide[5:] < 0.05).all()  # three dies wide, nothing past ~5
    assert thin[2] < 0.2  # today's rings: the third layer only in places


def test_mixed_wafers_carry_two_to_four_patterns_at_the_configured_rates():
    def classes(synth):
        return [len(set(np.unique(lab)) - {0}) for _, lab in drawn(synth, n=100)]

    four = classes(SynthConfig(**SIDE_52, pattern_free_fraction=0.0, mixed_fraction=1.0, mixed_three_fraction=0.0,
                               mixed_four_fraction=1.0))
    assert min(four) >= 3 and np.mean(np.array(four) == 4) >= 0.95  # a scratch may hide a small pattern
    two = classes(SynthConfig(**SIDE_52, pattern_free_fraction=0.0, mixed_fraction=1.0, mixed_three_fraction=0.0))
    assert min(two) >= 2 and max(two) == 2
    with pytest.raises(ValueError, match="must not exceed 1"):
        SynthConfig(mixed_three_fraction=0.6, mixed_four_fraction=0.5)


def test_double_rings_and_local_zones_draw_both_kinds():
    donut = {"ring_donut_fraction": 1.0, "ring_partial_fraction": 0.0}
    for f, want in ((1.0, 1.0), (0.0, 0.0)):  # a donut alone never reaches the rim
        rims = [np.mean(lab[layer_from_rim(d != NO_DIE) == 1] == ID["ring"]) > 0.5
                for d, lab in drawn(only("ring", **donut, double_ring_fraction=f))]
        assert np.mean(rims) == want
    inside_first = {"local_edge_fraction": 0.0}
    both = [(lab[layer_from_rim(d != NO_DIE) == 1] == ID["local zone"]).any()
            for d, lab in drawn(only("local zone", **inside_first, double_local_fraction=1.0))]
    alone = [(lab[layer_from_rim(d != NO_DIE) == 1] == ID["local zone"]).any()
             for d, lab in drawn(only("local zone", **inside_first))]
    assert all(both) and np.mean(alone) < 0.5


def test_a_crossing_scratch_runs_across_the_donut():
    def crossing(f):
        synth = only("ring", "scratch", mixed_fraction=1.0, mixed_three_fraction=0.0, ring_donut_fraction=1.0,
                     ring_partial_fraction=0.0, scratch_cross_fraction=f)
        out = []
        for d, lab in drawn(synth, n=100):
            r = radius(d != NO_DIE)
            scratch, ring = r[lab == ID["scratch"]], r[lab == ID["ring"]]
            out.append(scratch.size > 0 and ring.size > 0 and scratch.min() < np.median(ring) < scratch.max())
        return np.mean(out)

    assert crossing(1.0) >= 0.95 and crossing(0.0) < 0.85


def test_small_centres_are_small_dense_and_central():
    for d, lab in drawn(only("circle", circle_small_fraction=1.0, circle_small_dies=(2.0, 3.0))):
        on, dies = d != NO_DIE, lab == ID["circle"]
        assert 4 <= dies.sum() <= np.pi * 3.5**2 * 1.15  # radius 2-3 dies (elongation <= 1.15)
        assert (radius(on)[dies] * np.sqrt(on.sum() / np.pi)).max() < 7  # within ~6 dies of the centre
    today = [int((lab == ID["circle"]).sum()) for _, lab in drawn(only("circle"))]
    assert np.median(today) > 60


def test_local_zones_of_every_size():
    def sizes(**options):
        return [(lab == ID["local zone"]).sum() / (d != NO_DIE).sum()
                for d, lab in drawn(only("local zone", local_edge_fraction=0.0, **options), n=200)]

    p10, p90 = np.percentile(sizes(local_any_size_fraction=1.0), [10, 90])
    assert p10 < 0.005 and p90 > 0.09  # specks of a few dies to zones of a tenth of the wafer
    t10, t90 = np.percentile(sizes(), [10, 90])
    assert p90 / p10 > 1.5 * t90 / t10


def test_dense_patterns_fill_their_core():
    def core_fill(**options):
        out = []
        for d, lab in drawn(only("circle", **options)):
            dies = lab == ID["circle"]
            yy, xx = np.mgrid[:d.shape[0], :d.shape[1]]
            core = np.hypot(yy - yy[dies].mean(), xx - xx[dies].mean()) <= 0.6 * np.sqrt(dies.sum() / np.pi)
            out.append(dies[core & (d != NO_DIE)].mean())
        return np.median(out)

    assert core_fill(dense_fraction=1.0) >= 0.85 > core_fill()


def test_bad_ranges_are_refused():
    with pytest.raises(ValueError, match="ring_thick_dies must be"):
        SynthConfig(ring_thick_dies=(4.0, 2.0))
    with pytest.raises(ValueError, match="pattern_background_range must be"):
        SynthConfig(pattern_background_range=(0.1, 1.5))


def test_the_suggested_broad_block_in_the_default_config_is_broad_options():
    """configs/default.yaml carries the widening as a commented block: uncommented it is BROAD_OPTIONS."""
    import yaml

    from fcn_core.config import resolve_config_path
    from fcn_core.synth import BROAD_OPTIONS

    text = resolve_config_path("default").read_text()
    block = re.search(r"# >>> broad generator.*?\n(.*?)# <<< broad generator", text, re.S)
    assert block, "the commented block is missing from configs/default.yaml"
    lines = [m.group(1) for line in block.group(1).splitlines() if (m := re.match(r"^\s*# ([a-z_]+: .*)$", line))]
    suggested = yaml.safe_load("\n".join(lines))
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in suggested.items()} == BROAD_OPTIONS
    assert SynthConfig(**suggested).mixed_four_fraction == BROAD_OPTIONS["mixed_four_fraction"]
    assert generate_wafers(40, seed=2, synth=SynthConfig(**BROAD_OPTIONS)).num_rows == 40
