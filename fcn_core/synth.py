"""Seeded generator of realistic, die-level labelled wafer maps (calibration: docs/synth.md).

Model, top-down:

- A **lot** (``wafers_per_lot`` consecutive wafers) runs one *product*: grid size, wafer outline
  (an ellipse filling the grid, optional flat/notch, optional no-die test sites), background fail
  rate and test night are drawn once per lot, as in a fab.
- A **wafer** gets Bernoulli background fails (inner rate from a Poisson yield model, higher on the
  outermost dies), then either nothing more (clean, heavy-random or near-full: label ``none``) or
  one to three (four with the options) patterns: ring (full/partial edge ring, donut), scratch
  (thin straight/curved lines with gaps, branches), local zone (irregular blob at the edge or
  inside), circle (centre cluster).
- Options widen this towards MixedWM38 and other sources (``SynthConfig``'s issue-#13 block,
  ``BROAD_OPTIONS``): heavy random fails under patterns, thick rings, up to four patterns, a donut
  and an edge ring (or both local zone kinds) on one wafer, scratches across rings, small and dense
  centres, zones of every size. All are off by default, and off they draw no random number, so the
  default config's wafers are exactly those it drew before they existed.
- Only fail dies a pattern caused carry its class id; background fails stay 0. Patterns are drawn
  in the order ring, local zone, circle, scratch and a later one overwrites an earlier one's label
  on shared dies, so thin scratches stay continuous across a ring or a blob.

Everything is vectorised over the dies of a wafer (1-D arrays over on-wafer dies); randomness
comes from one generator per lot and one per wafer, keyed by (seed, index), so any slice of
indices is reproducible on its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone

import numpy as np
import pyarrow as pa

from fcn_core.config import DEFAULT_CLASSES, ClassSpec, SynthConfig
from fcn_core.stages import NO_PATTERN
from fcn_core.table import FAIL, PASS, make_table

# The generator's pattern kinds, by class name; ids always come from the class list.
RING, SCRATCH, LOCAL, CIRCLE = "ring", "scratch", "local zone", "circle"
PATTERN_KINDS = (RING, SCRATCH, LOCAL, CIRCLE)
DRAW_ORDER = (RING, LOCAL, CIRCLE, SCRATCH)  # last drawn wins a shared die
NONE_LABEL = NO_PATTERN  # a wafer without pattern: the verdict's "none" (fcn_core.stages)
DEFAULT_START_DATE = date(2026, 1, 1)

# The widening towards MixedWM38 and other sources (issue #13; measured in docs/synth.md), suggested
# (commented out) in configs/default.yaml under data.synth: off by default, because turning it on
# changes the demo's training data and figures. Ranges are wider than MixedWM38's on purpose: a
# model should meet every real set's patterns, not copy one set's.
BROAD_OPTIONS: dict = {
    "mixed_fraction": 0.6,
    "mixed_three_fraction": 0.35,
    "mixed_four_fraction": 0.1,
    "pattern_background_fraction": 0.5,
    "pattern_background_range": (0.08, 0.3),
    "ring_thick_fraction": 0.6,
    "ring_thick_dies": (1.5, 5.0),
    "double_ring_fraction": 0.15,
    "double_local_fraction": 0.15,
    "scratch_cross_fraction": 0.5,
    "circle_small_fraction": 0.35,
    "circle_small_dies": (1.5, 4.0),
    "local_any_size_fraction": 0.5,
    "local_radius_range": (0.03, 0.45),
    "dense_fraction": 0.5,
}

_REF_DIES = 550  # background_rate is the inner-die fail rate of a product with this many dies
_LOT_STREAM, _WAFER_STREAM = 1, 2  # keep lot and wafer random streams apart
_TWO_PI = 2 * np.pi


# -- products (per lot) ---------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class _Product:
    """What every wafer of a lot shares; per-die arrays run over on-wafer dies only."""

    height: int
    width: int
    template: np.ndarray  # (h*w,) uint8, NO_DIE / PASS
    sites: np.ndarray  # (n,) flat index of each on-wafer die
    slot: np.ndarray  # (h*w,) position in `sites`, -1 off-wafer
    u: np.ndarray  # (n,) normalised coordinates: wafer radius 1, +u right, +v down
    v: np.ndarray
    r: np.ndarray
    theta: np.ndarray
    depth: np.ndarray  # (n,) 1 = outermost die, 2, 3, 4 = deeper
    centre: tuple[float, float]  # (row, col) of the wafer centre in die units
    radii: tuple[float, float]  # (ry, rx) in die units
    die_radius: float  # wafer radius in dies, sqrt(ry * rx): one die is 1 / die_radius normalised
    inner_rate: float  # lot median background fail probability of inner dies
    edge_boost: float  # lot median factor on the outermost dies' rate
    start: datetime  # when the lot's first wafer was tested


def _draw_size(rng: np.random.Generator, s: SynthConfig) -> tuple[int, int]:
    if rng.random() < s.size_mode_fraction:  # the high-volume product: 25x27, 26x26, 27x25 ...
        side, log_aspect = s.size_mode * np.exp(rng.normal(0, 0.01)), rng.normal(0, 0.06)
    else:
        # The other products are larger: a log-normal excess over the high-volume side (real: p5 31,
        # median 42, p95 79, a few past 150).
        excess = max(s.size_median - s.size_mode, 1.0) * np.exp(rng.normal(0, s.size_sigma))
        side, log_aspect = s.size_mode + excess, rng.laplace(0, s.aspect_scale)
    h = int(np.clip(round(side * np.exp(-log_aspect / 2)), s.size_min, s.size_max))
    w = int(np.clip(round(side * np.exp(log_aspect / 2)), s.size_min, s.size_max))
    return h, w


def _depth(mask: np.ndarray) -> np.ndarray:
    """Taxicab depth of each die inside `mask` (1 = touches off-wafer), capped at 4."""
    depth = np.zeros(mask.shape, np.uint8)
    cur = mask
    for k in (1, 2, 3):
        p = np.pad(cur, 1)
        inner = cur & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
        depth[cur & ~inner] = k
        cur = inner
    depth[cur] = 4
    return depth


def _make_product(lot: int, *, seed: int, synth: SynthConfig, start_date: date) -> _Product:
    rng = np.random.default_rng([seed, _LOT_STREAM, lot])
    h, w = _draw_size(rng, synth)
    # The wafer fills the grid: an ellipse (dies are not square) with its centre up to 0.3 die off
    # the grid centre and a radius 0.97-1.0 of the half side, grown where needed so that every
    # border row and column keeps a die (as on every real map).
    dy, dx = rng.uniform(-0.3, 0.3, 2)
    cy, cx = (h - 1) / 2 + dy, (w - 1) / 2 + dx
    ey, ex = abs(cy - round(cy)), abs(cx - round(cx))  # nearest die row/column to the centre
    scale = max(rng.uniform(0.97, 1.005),
                np.hypot(((h - 1) / 2 + abs(dy)) / (h / 2), ex / (w / 2)) + 1e-9,
                np.hypot(((w - 1) / 2 + abs(dx)) / (w / 2), ey / (h / 2)) + 1e-9)
    ry, rx = h / 2 * scale, w / 2 * scale
    rows = (np.arange(h) - cy) / ry
    cols = (np.arange(w) - cx) / rx
    vv, uu = np.meshgrid(rows, cols, indexing="ij")
    mask = vv**2 + uu**2 <= 1.0
    if rng.random() < synth.flat_fraction:  # flat: a chord 1-2 die rows deep at the bottom
        mask &= vv <= 1 - rng.uniform(1.0, 2.0) / ry
    if rng.random() < synth.notch_fraction:  # notch: a die or a few at the bottom tip
        mask &= np.hypot((vv - 1) * ry, uu * rx) > rng.uniform(0.8, 1.6)
    if rng.random() < synth.skip_site_fraction:
        mask &= ~_skip_sites(rng, mask)
    depth2d = _depth(mask)
    flat_mask = mask.ravel()
    sites = np.flatnonzero(flat_mask)
    slot = np.full(h * w, -1, np.int32)
    slot[sites] = np.arange(sites.size, dtype=np.int32)
    u, v = uu.ravel()[sites], vv.ravel()[sites]
    n_dies = max(sites.size, 1)
    # Poisson yield: a die fails with 1 - exp(-defects per die); defects per die grow with die area,
    # i.e. shrink with the number of dies per wafer (as on the real maps: docs/synth.md).
    lam_ref = -np.log1p(-synth.background_rate)
    lam = lam_ref * _REF_DIES / n_dies * np.exp(rng.normal(0, synth.background_lot_sigma))
    inner_rate = float(1 - np.exp(-lam))
    # The edge effect is relatively stronger on products with many small dies (real maps: docs/synth.md).
    edge_boost = float(synth.edge_fail_boost * (n_dies / _REF_DIES) ** 0.3 * np.exp(rng.normal(0, 0.25)))
    # Lots start 18:00-21:00 on one of the nights and take at most 2.5 hours, so every capture stays
    # on its night's date: `nights` nights give `nights` capture dates (ingest partitions).
    night = int(rng.integers(synth.nights))
    start = datetime.combine(start_date, time(18, 0), tzinfo=timezone.utc) + timedelta(
        days=night, minutes=int(rng.integers(0, 3 * 60))
    )
    return _Product(
        height=h, width=w, template=flat_mask.astype(np.uint8) * PASS, sites=sites, slot=slot,
        u=u, v=v, r=np.hypot(u, v), theta=np.arctan2(v, u), depth=depth2d.ravel()[sites],
        centre=(cy, cx), radii=(ry, rx), die_radius=float(np.sqrt(ry * rx)),
        inner_rate=inner_rate, edge_boost=max(edge_boost, 1.0), start=start,
    )


def _skip_sites(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    """Inside-wafer die sites a product never tests (process-control structures): short row runs."""
    h, w = mask.shape
    n = int(rng.integers(1, 12))
    rows = rng.integers(0, h, n)
    starts = rng.integers(0, w, n)
    lengths = np.where(rng.random(n) < 0.6, 1, rng.integers(2, 6, n))
    offsets = np.arange(6)
    cols = starts[:, None] + offsets[None, :]
    keep = (offsets[None, :] < lengths[:, None]) & (cols < w)
    skip = np.zeros_like(mask)
    skip[np.broadcast_to(rows[:, None], cols.shape)[keep], cols[keep]] = True
    return skip & (_depth(mask) >= 2)  # inside: the outline stays intact


# -- small helpers --------------------------------------------------------------------------------
def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * x))


def _wrap(angle: np.ndarray | float) -> np.ndarray | float:
    """Angle difference folded into [-pi, pi)."""
    return (angle + np.pi) % _TWO_PI - np.pi


def _wobble(rng: np.random.Generator, theta: np.ndarray, amplitude: float,
            orders: Sequence[int] = (2, 3, 5)) -> np.ndarray:
    """1 + a smooth random function of the angle: ragged, non-circular outlines."""
    out = np.ones_like(theta)
    for k in orders:
        out += rng.uniform(0, amplitude) / k**0.5 * np.cos(k * theta + rng.uniform(0, _TWO_PI))
    return out


def _smooth_field(rng: np.random.Generator, g: _Product, *, cells: int) -> np.ndarray:
    """A random field in [0, 1] varying over ~2/cells of the wafer (bilinear on a coarse grid)."""
    coarse = rng.random((cells + 1, cells + 1))
    fy = np.clip((g.v + 1) / 2 * cells, 0, cells - 1e-9)
    fx = np.clip((g.u + 1) / 2 * cells, 0, cells - 1e-9)
    iy, ix = fy.astype(np.intp), fx.astype(np.intp)
    ty, tx = fy - iy, fx - ix
    top = coarse[iy, ix] * (1 - tx) + coarse[iy, ix + 1] * tx
    bottom = coarse[iy + 1, ix] * (1 - tx) + coarse[iy + 1, ix + 1] * tx
    return top * (1 - ty) + bottom * ty


def _disc_points(rng: np.random.Generator, radius: float) -> tuple[float, float]:
    """A point uniform over the centred disc of this (normalised) radius."""
    r, a = radius * np.sqrt(rng.random()), rng.uniform(0, _TWO_PI)
    return r * np.cos(a), r * np.sin(a)


def _fire(rng: np.random.Generator, prob: np.ndarray) -> np.ndarray:
    return rng.random(prob.shape[0]) < prob


# -- background -----------------------------------------------------------------------------------
def _background_rate(rng: np.random.Generator, g: _Product, s: SynthConfig) -> np.ndarray:
    inner = g.inner_rate * np.exp(rng.normal(0, s.background_wafer_sigma))
    boost = g.edge_boost * np.exp(rng.normal(0, 0.2)) - 1
    factor = 1 + boost * (g.depth == 1) + 0.15 * boost * (g.depth == 2)
    tilt = rng.uniform(0, 0.6)  # real maps also fail a little more towards the rim overall
    return np.minimum(inner * factor * (1 + tilt * (g.r * g.r - 0.5)), 0.95)


def _heavy_background_rate(rng: np.random.Generator, g: _Product, s: SynthConfig) -> np.ndarray:
    """MixedWM38-like random fails under patterns: one rate per wafer, the same on every die
    (MixedWM38: 0.18-0.23 around its patterns, no extra failure on the rim)."""
    return np.full(g.u.shape, rng.uniform(*s.pattern_background_range))


def _random_rate(rng: np.random.Generator, g: _Product) -> np.ndarray:
    """WM-811K 'Random': 30-65 % of dies fail, blotchy rather than uniform."""
    level = rng.uniform(0.3, 0.65)
    field = _smooth_field(rng, g, cells=int(rng.integers(3, 8)))
    return np.clip(level * (1 + rng.uniform(0.3, 0.9) * (field - 0.5) * 2), 0.02, 0.98)


def _near_full_rate(rng: np.random.Generator, g: _Product) -> np.ndarray:
    """WM-811K 'Near-full': almost every die fails, sometimes a passing side or speckle."""
    rate = np.full(g.u.shape, 1.0 if rng.random() < 0.3 else rng.uniform(0.8, 1.0))
    if rng.random() < 0.5:
        phi = rng.uniform(0, _TWO_PI)
        along = g.u * np.cos(phi) + g.v * np.sin(phi)
        side = _sigmoid((along - rng.uniform(0.1, 0.8)) / 0.08)
        rate = rate * (1 - side) + rng.uniform(0.1, 0.5) * side
    return rate


# -- patterns: each returns the boolean mask of the dies it makes fail ------------------------------
def _edge_ring(rng: np.random.Generator, g: _Product, *, partial: bool, thick_dies: tuple[float, float] | None = None
               ) -> np.ndarray:
    """The outermost dies fail almost all round, a second die layer in places (real: 100 %, 36 %).

    ``thick_dies``: a thick band instead, its radial width drawn in that range of dies, wobbling
    along the rim (MixedWM38 Edge-Ring: 2-3 dies; other sources up to ~5).
    """
    if thick_dies is not None:
        width = rng.uniform(*thick_dies) * _wobble(rng, g.theta, 0.3, orders=(1, 2, 3))
        inward = np.maximum((1 - g.r) * g.die_radius, 0.0)  # dies in from the rim (outermost: ~0-1)
        prob = rng.uniform(0.8, 1.0) * np.where(g.depth == 1, 1.0, _sigmoid((width - inward) / 0.4))
    else:
        along = _wobble(rng, g.theta, 1.2, orders=(1, 2, 3)) / 2  # where the band is thicker
        prob = np.where(g.depth == 1, rng.uniform(0.85, 1.0),
                        np.where(g.depth == 2, rng.uniform(0.2, 0.9) * np.clip(along + 0.2, 0, 1),
                                 np.where(g.depth == 3, rng.uniform(0, 0.4) * np.clip(along - 0.2, 0, 1), 0.0)))
    gate = np.ones_like(g.theta)
    if partial:  # an arc of 120-300 degrees
        half = rng.uniform(np.pi / 3, 5 * np.pi / 6)
        gate = _sigmoid((half - np.abs(_wrap(g.theta - rng.uniform(0, _TWO_PI)))) / 0.08)
    elif rng.random() < 0.3:  # a few short gaps in a full ring
        for _ in range(int(rng.integers(1, 4))):
            gap = np.abs(_wrap(g.theta - rng.uniform(0, _TWO_PI))) < rng.uniform(0.05, 0.3)
            gate = np.where(gap, 0.15, gate)
    return _fire(rng, prob * gate)


def _donut(rng: np.random.Generator, g: _Product, *, dense: bool = False) -> np.ndarray:
    """A band around the centre at mid radius, often broken, with ragged edges.

    ``dense``: a solid band all round (fill 0.9-1, no patches, no arc), as MixedWM38 draws them.
    """
    oy, ox = rng.normal(0, 0.05, 2)
    du, dv = g.u - ox, g.v - oy
    rr, th = np.hypot(du, dv), np.arctan2(dv, du)
    inner = rng.uniform(0.15, 0.45)
    if rng.random() < 0.15:  # a thin circle of fails, a die or two wide
        outer = inner + 1.5 / g.die_radius
    else:
        outer = min(inner + max(rng.uniform(0.15, 0.45), 2.5 / g.die_radius), 0.9)
    mid = (inner + outer) / 2 * _wobble(rng, th, 0.12)
    half = (outer - inner) / 2
    prob = rng.uniform(0.9 if dense else 0.75, 1.0) * _sigmoid((half - np.abs(rr - mid)) / rng.uniform(0.015, 0.05))
    if dense:
        return _fire(rng, prob)
    patchy = rng.uniform(0, 0.5)  # real donuts are often denser in some stretches than in others
    prob = prob * (1 - patchy + patchy * _smooth_field(rng, g, cells=int(rng.integers(3, 7))))
    if rng.random() < 0.5:  # an arc, not the whole band
        arc = rng.uniform(0.4, 0.9) * np.pi
        prob = prob * _sigmoid((arc - np.abs(_wrap(th - rng.uniform(0, _TWO_PI)))) / 0.25)
    return _fire(rng, prob)


def _blob(rng: np.random.Generator, du: np.ndarray, dv: np.ndarray, *, radius: float, elongation: float,
          fill: float, softness: float, halo: float) -> np.ndarray:
    """An irregular ellipse around (0, 0) with a soft rim and a sparse halo."""
    phi = rng.uniform(0, np.pi)
    a = du * np.cos(phi) + dv * np.sin(phi)
    b = -du * np.sin(phi) + dv * np.cos(phi)
    dist = np.hypot(a / elongation, b * elongation)
    edge = radius * _wobble(rng, np.arctan2(b, a), 0.35)
    prob = fill * _sigmoid((edge - dist) / softness)
    if halo > 0:
        prob = prob + halo * np.exp(-np.maximum(dist - edge, 0) / (0.5 * radius))
    return np.minimum(prob, 1.0)


def _circle(rng: np.random.Generator, g: _Product, *, small_dies: tuple[float, float] | None = None,
            dense: bool = False) -> np.ndarray:
    """WM-811K 'Center': a cluster on or slightly off the centre (real: area ~5 %, offset < 0.17).

    ``small_dies``: a small dense cluster instead, its radius drawn in that range of dies (the
    centres MixedWM38 puts inside donuts and beside edge rings). ``dense``: fill 0.9-1, no halo.
    """
    oy, ox = rng.normal(0, 0.035, 2)
    if small_dies is not None:
        radius = rng.uniform(*small_dies) / g.die_radius
        prob = _blob(rng, g.u - ox, g.v - oy, radius=radius, elongation=rng.uniform(1.0, 1.15),
                     fill=rng.uniform(0.9, 1.0), softness=0.3 / g.die_radius, halo=0.0)
        return _fire(rng, prob)
    radius = float(np.clip(0.24 * np.exp(rng.normal(0, 0.35)), max(0.08, 1.5 / g.die_radius), 0.5))
    prob = _blob(rng, g.u - ox, g.v - oy, radius=radius, elongation=rng.uniform(1.0, 1.3),
                 fill=rng.uniform(0.9 if dense else 0.55, 1.0), softness=rng.uniform(0.01, 0.06),
                 halo=0.0 if dense else rng.uniform(0, 0.35) if rng.random() < 0.5 else 0.0)
    return _fire(rng, prob)


def _local_zone(rng: np.random.Generator, g: _Product, *, at_edge: bool,
                any_size: tuple[float, float] | None = None, dense: bool = False) -> np.ndarray:
    """An irregular blob: inside the wafer (Loc) or on its rim, stretched along it (Edge-Loc).

    ``any_size``: inside, the radius is log-uniform over that range of wafer radii (at least one
    die), so a few-die speck is as likely as a zone covering a fifth of the wafer; at the edge, the
    length along the rim is log-uniform over 3 dies..1.6 radii (up to half the rim, as MixedWM38's)
    and the depth over 2 dies..0.35. ``dense``: fill 0.9-1, no halo, not sparser inwards.
    """
    angle = rng.uniform(0, _TWO_PI)
    if at_edge:
        # Work in (along the rim, in from the rim) coordinates so the blob hugs the edge.
        centre_depth = rng.uniform(0.0, 0.1)
        along = _wrap(g.theta - angle) * g.r
        inward = (1 - g.r) - centre_depth
        die = 1 / g.die_radius  # at least ~2 dies deep and 3 long, else it is just edge noise
        if any_size is not None:
            length = float(np.exp(rng.uniform(np.log(min(3 * die, 1.6)), np.log(1.6))))
            depth = float(np.exp(rng.uniform(np.log(min(2 * die, 0.35)), np.log(0.35))))
        else:
            length = float(np.clip(0.3 * np.exp(rng.normal(0, 0.6)), 3 * die, 1.2))
            depth = float(np.clip(0.15 * np.exp(rng.normal(0, 0.6)), 2 * die, 0.6))
        dist = np.hypot(along / length, inward / depth)
        edge = _wobble(rng, np.arctan2(inward, along), 0.3)
        prob = rng.uniform(0.9 if dense else 0.6, 1.0) * _sigmoid((edge - dist) / rng.uniform(0.05, 0.15))
        if not dense:
            prob = prob * (1 - rng.uniform(0, 0.3) * np.clip(inward / depth, 0, 1))  # sparser inwards
        return _fire(rng, prob)
    where = np.sqrt(rng.uniform(0.02, 0.6))
    if any_size is not None:
        lo, hi = (max(x, 1.0 / g.die_radius) for x in any_size)
        radius = float(np.exp(rng.uniform(np.log(lo), np.log(max(hi, lo)))))
    else:
        radius = float(np.clip(0.16 * np.exp(rng.normal(0, 0.55)), max(0.05, 1.5 / g.die_radius), 0.45))
    prob = _blob(rng, g.u - where * np.cos(angle), g.v - where * np.sin(angle), radius=radius,
                 elongation=rng.uniform(1.0, 1.8), fill=rng.uniform(0.9 if dense else 0.35, 1.0),
                 softness=rng.uniform(0.01, 0.05),
                 halo=0.0 if dense else rng.uniform(0, 0.3) if rng.random() < 0.4 else 0.0)
    return _fire(rng, prob)


def _scratch(rng: np.random.Generator, g: _Product, *, across: bool = False) -> np.ndarray:
    """Thin straight or curved lines, with gaps and sometimes a branch or a parallel twin.

    Drawn as points every 0.4 die along the curve, snapped to dies: cost follows the line's
    length, not the wafer's area. ``across``: one more line first, from the rim through the inner
    wafer (r < 0.3) and on for 1.3-1.9 radii, so it crosses a donut's band or an edge ring.
    """
    ry, rx = g.radii
    step = 0.4 / max(ry, rx)
    us, vs = [], []
    if across:
        a0 = rng.uniform(0, _TWO_PI)
        u0, v0 = 0.97 * np.cos(a0), 0.97 * np.sin(a0)
        u1, v1 = _disc_points(rng, 0.3)
        heading = np.arctan2(v1 - v0, u1 - u0)
        s = np.arange(0, rng.uniform(1.3, 1.9), step)
        head = heading + rng.uniform(-0.15, 0.15) * s + np.cumsum(rng.normal(0, 0.02, s.size))
        us.append(u0 + np.cumsum(np.cos(head)) * step)
        vs.append(v0 + np.cumsum(np.sin(head)) * step)
    n_lines = 1 + int(rng.random() < 0.25) - int(across)
    for _ in range(n_lines):
        # Most real scratches run in from the rim (handling damage); the others start anywhere.
        # Either way they head for a point of the inner wafer, so they cross dies, not the rim.
        if rng.random() < 0.6:
            a0 = rng.uniform(0, _TWO_PI)
            (u0, v0) = 0.97 * np.cos(a0), 0.97 * np.sin(a0)
        else:
            (u0, v0) = _disc_points(rng, 0.9)
        (u1, v1) = _disc_points(rng, 0.6)
        heading = np.arctan2(v1 - v0, u1 - u0) + rng.normal(0, 0.3)
        length = max(rng.uniform(0.3, 1.5), 5 / g.die_radius)
        # curvature in 1/wafer radius; turning at most ~140 degrees end to end
        bend = 0.0 if rng.random() < 0.4 else float(np.clip(rng.normal(0, 1.0), -2.5 / length,
                                                            2.5 / length))
        s = np.arange(0, length, step)
        head = heading + bend * s + np.cumsum(rng.normal(0, 0.02, s.size))
        pu = u0 + np.cumsum(np.cos(head)) * step
        pv = v0 + np.cumsum(np.sin(head)) * step
        if rng.random() < 0.6:  # gaps: the line skips over short stretches
            period = rng.uniform(0.1, 0.5)
            keep = ((s / period + rng.uniform()) % 1) >= rng.uniform(0.05, 0.3)
            pu, pv, head = pu[keep], pv[keep], head[keep]
        us.append(pu)
        vs.append(pv)
        if rng.random() < 0.3 and pu.size > 4:  # a branch from a point of the line
            k = int(rng.integers(pu.size))
            b_head = head[k] + rng.choice([-1, 1]) * rng.uniform(0.3, 1.2)
            b_s = np.arange(0, rng.uniform(0.15, 0.6), step)
            us.append(pu[k] + np.cos(b_head) * b_s)
            vs.append(pv[k] + np.sin(b_head) * b_s)
    pu, pv = np.concatenate(us), np.concatenate(vs)
    cy, cx = g.centre
    rows, cols = cy + pv * ry, cx + pu * rx
    if max(ry, rx) < 25 and rng.random() < 0.35:  # two dies wide on small maps
        rows, cols = np.concatenate([rows, rows + 0.7]), np.concatenate([cols, cols + 0.7])
    rows, cols = np.rint(rows).astype(np.intp), np.rint(cols).astype(np.intp)
    ok = (rows >= 0) & (rows < g.height) & (cols >= 0) & (cols < g.width)
    dies = g.slot[rows[ok] * g.width + cols[ok]]
    dies = np.unique(dies[dies >= 0])
    dies = dies[rng.random(dies.size) < rng.uniform(0.8, 1.0)]
    hit = np.zeros(g.sites.size, bool)
    hit[dies] = True
    return hit


# -- wafers ---------------------------------------------------------------------------------------
def _pattern(rng: np.random.Generator, kind: str, g: _Product, s: SynthConfig, *, variant: str | None = None,
             across: bool = False) -> tuple[np.ndarray, str]:
    """(fail mask, variant) of one pattern; ``variant`` forces a sub-kind ('donut', 'edge ring',
    'edge', 'inside'), else it is drawn. Options at their defaults draw no extra random number."""
    if kind == RING:
        if variant is None:
            u = rng.random()
            variant = "donut" if u < s.ring_donut_fraction else (
                "partial ring" if u < s.ring_donut_fraction + s.ring_partial_fraction else "edge ring")
        if variant == "donut":
            return _donut(rng, g, dense=_dense(rng, s)), variant
        thick = s.ring_thick_fraction > 0 and rng.random() < s.ring_thick_fraction
        return _edge_ring(rng, g, partial=variant == "partial ring",
                          thick_dies=s.ring_thick_dies if thick else None), variant
    if kind == SCRATCH:
        return _scratch(rng, g, across=across), "scratch"
    if kind == LOCAL:
        if variant is None:
            variant = "edge" if rng.random() < s.local_edge_fraction else "inside"
        any_size = s.local_any_size_fraction > 0 and rng.random() < s.local_any_size_fraction
        return _local_zone(rng, g, at_edge=variant == "edge", any_size=s.local_radius_range if any_size else None,
                           dense=_dense(rng, s)), variant
    small = s.circle_small_fraction > 0 and rng.random() < s.circle_small_fraction
    return _circle(rng, g, small_dies=s.circle_small_dies if small else None, dense=_dense(rng, s)), "circle"


def _dense(rng: np.random.Generator, s: SynthConfig) -> bool:
    """Draw a solid donut, centre or local zone (``dense_fraction``); no random number when off."""
    return s.dense_fraction > 0 and rng.random() < s.dense_fraction


# the other sub-kind of a ring or local zone, for double_ring_fraction and double_local_fraction
_OTHER_VARIANT = {"donut": "edge ring", "edge ring": "donut", "partial ring": "donut", "edge": "inside",
                  "inside": "edge"}


def _n_patterns(rng: np.random.Generator, s: SynthConfig) -> int:
    """1, or on mixed wafers 2, 3 or 4 (mixed_three_fraction, mixed_four_fraction)."""
    if rng.random() >= s.mixed_fraction:
        return 1
    u = rng.random()
    return 2 + int(u < s.mixed_three_fraction + s.mixed_four_fraction) + int(u < s.mixed_four_fraction)


def _wafer(rng: np.random.Generator, g: _Product, s: SynthConfig, weights: np.ndarray,
           ids: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """One wafer: (fail mask, label) over the product's on-wafer dies."""
    kinds: list[str] = []
    if rng.random() < s.pattern_free_fraction:
        u = rng.random()
        if u < s.random_fraction:
            rate = _random_rate(rng, g)
        elif u < s.random_fraction + s.near_full_fraction:
            rate = _near_full_rate(rng, g)
        else:
            rate = _background_rate(rng, g, s)
    else:
        heavy = s.pattern_background_fraction > 0 and rng.random() < s.pattern_background_fraction
        rate = _heavy_background_rate(rng, g, s) if heavy else _background_rate(rng, g, s)
        n_kinds = min(_n_patterns(rng, s), int((weights > 0).sum()))
        picks = rng.choice(len(PATTERN_KINDS), n_kinds, replace=False, p=weights)
        chosen = {PATTERN_KINDS[i] for i in picks}
        kinds = [k for k in DRAW_ORDER if k in chosen]
    fail = _fire(rng, rate)
    label = np.zeros(g.sites.size, np.uint8)
    for kind in kinds:
        across = (kind == SCRATCH and RING in kinds and s.scratch_cross_fraction > 0
                  and rng.random() < s.scratch_cross_fraction)
        hit, variant = _pattern(rng, kind, g, s, across=across)
        double = {RING: s.double_ring_fraction, LOCAL: s.double_local_fraction}.get(kind, 0.0)
        if double > 0 and rng.random() < double:
            hit = hit | _pattern(rng, kind, g, s, variant=_OTHER_VARIANT[variant])[0]
        fail |= hit
        label[hit] = ids[kind]
    return fail, label


def pattern_ids(classes: Sequence[ClassSpec] | None = None) -> dict[str, int]:
    """Class id of each pattern kind the generator draws, looked up by class name."""
    by_name = {c.name: c.id for c in (classes or DEFAULT_CLASSES)}
    missing = [k for k in PATTERN_KINDS if k not in by_name]
    if missing:
        raise ValueError(f"the generator needs classes named {missing}; configured: {sorted(by_name)}")
    return {k: by_name[k] for k in PATTERN_KINDS}


def _pattern_weights(s: SynthConfig) -> np.ndarray:
    unknown = sorted(set(s.pattern_weights) - set(PATTERN_KINDS))
    if unknown:
        raise ValueError(f"pattern_weights has unknown pattern names {unknown}; "
                         f"known: {list(PATTERN_KINDS)}")
    w = np.array([float(s.pattern_weights.get(k, 0.0)) for k in PATTERN_KINDS])
    return w / w.sum() if w.sum() > 0 else w


def lot_number(index: int, synth: SynthConfig) -> int:
    """The lot a wafer index belongs to: blocks of wafers_per_lot, repeating after `lots` lots."""
    block = index // synth.wafers_per_lot
    return block % synth.lots if synth.lots else block


def generate_wafers(
    n: int,
    *,
    seed: int,
    synth: SynthConfig | None = None,
    start_index: int = 0,
    start_date: date | None = None,
    classes: Sequence[ClassSpec] | None = None,
) -> pa.Table:
    """`n` labelled synthetic wafers (indices start_index..start_index+n-1) as a wafer table.

    Row i depends only on (seed, synth, start_index + i, start_date), so tables generated in
    pieces concatenate to the table generated at once. ``classes`` (default: the configured
    defaults) only maps pattern names to label ids and wafer_label order.
    """
    if n < 0 or start_index < 0:
        raise ValueError(f"n and start_index must be >= 0, got n={n}, start_index={start_index}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    s = synth or SynthConfig()
    ids = pattern_ids(classes)
    weights = _pattern_weights(s)
    names_by_id = {i: k for k, i in ids.items()}
    day0 = start_date or DEFAULT_START_DATE
    spacing_s = min(150.0, 9000.0 / s.wafers_per_lot)
    lot, g = -1, None  # a lot's wafers are consecutive: keep only the current product in memory
    wafer_ids, lot_ids, times, die_maps, label_maps, wafer_labels = [], [], [], [], [], []
    for index in range(start_index, start_index + n):
        if lot_number(index, s) != lot or g is None:
            lot = lot_number(index, s)
            g = _make_product(lot, seed=seed, synth=s, start_date=day0)
        rng = np.random.default_rng([seed, _WAFER_STREAM, index])
        fail, label = _wafer(rng, g, s, weights, ids)
        die = g.template.copy()
        die[g.sites[fail]] = FAIL
        lab = np.zeros(g.height * g.width, np.uint8)
        lab[g.sites] = label
        present = np.flatnonzero(np.bincount(label, minlength=1)[1:]) + 1
        wafer_labels.append("+".join(names_by_id[int(i)] for i in sorted(present)) or NONE_LABEL)
        wafer_ids.append(f"syn-{seed}-{index:07d}")
        lot_ids.append(f"syn-{seed}-lot{lot:06d}")
        slot = index % s.wafers_per_lot  # lot order, a wafer every 2.5 minutes (less for huge lots)
        times.append(g.start + timedelta(seconds=slot * spacing_s + int(rng.integers(0, 60))))
        die_maps.append(die.reshape(g.height, g.width))
        label_maps.append(lab.reshape(g.height, g.width))
    return make_table(wafer_ids=wafer_ids, die_maps=die_maps, label_maps=label_maps, lot_ids=lot_ids,
                      captured_at=times, wafer_labels=wafer_labels)


def iter_wafer_chunks(
    n: int,
    chunk_size: int,
    *,
    seed: int,
    synth: SynthConfig | None = None,
    start_date: date | None = None,
    classes: Sequence[ClassSpec] | None = None,
) -> Iterator[pa.Table]:
    """`n` wafers as tables of at most `chunk_size` rows: bounded memory for millions of wafers."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    for start in range(0, n, chunk_size):
        yield generate_wafers(min(chunk_size, n - start), seed=seed, synth=synth, start_index=start,
                              start_date=start_date, classes=classes)
