"""Pictures: files are real PNGs of a plausible size; bad input gives clear errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image

from fcn_core.config import DEFAULT_CLASSES
from fcn_core.render import DPI, PANEL_INCHES, render_confusion, render_curves, render_wafers
from fcn_core.table import make_table


def _maps(h: int, w: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    on = (yy - h / 2) ** 2 / (h / 2) ** 2 + (xx - w / 2) ** 2 / (w / 2) ** 2 <= 1
    die = np.where(on, 1, 0).astype(np.uint8)
    die[on & (rng.random((h, w)) < 0.2)] = 2
    label = np.where(die == 2, rng.integers(0, 5, (h, w)), 0).astype(np.uint8)
    return die, label


def _png_size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size  # (width, height)


def test_render_wafers_three_columns(tmp_path):
    maps = [_maps(h, w, i) for i, (h, w) in enumerate([(26, 26), (56, 53), (1, 1)])]
    dies = [d for d, _ in maps]
    labels = [lab for _, lab in maps]
    preds = [lab[::-1, ::-1].copy() if i != 1 else None for i, lab in enumerate(labels)]
    out = render_wafers(dies, tmp_path / "sub" / "w.png", classes=DEFAULT_CLASSES, label_maps=labels,
                        predictions=preds, titles=["a", "b", "c"])
    assert out.exists() and out.stat().st_size > 5_000
    width, height = _png_size(out)
    assert abs(width - 3 * PANEL_INCHES * DPI) <= 2          # die | truth | prediction
    assert 3 * PANEL_INCHES * DPI <= height <= (3 * PANEL_INCHES + 1) * DPI


def test_render_wafers_die_maps_only_and_ncols(tmp_path):
    dies = [_maps(20, 30, i)[0] for i in range(5)]
    out = render_wafers(dies, tmp_path / "d.png", classes=DEFAULT_CLASSES, ncols=3)
    width, height = _png_size(out)
    assert abs(width - 3 * PANEL_INCHES * DPI) <= 2          # 3 wafers side by side, 1 panel each
    assert 2 * PANEL_INCHES * DPI <= height <= (2 * PANEL_INCHES + 1) * DPI


def test_render_wafers_from_table_uses_labels_and_ids(tmp_path):
    maps = [_maps(12, 9, i) for i in range(2)]
    table = make_table(wafer_ids=["x1", "x2"], die_maps=[d for d, _ in maps],
                       label_maps=[maps[0][1], None], wafer_labels=["Center", None])
    out = render_wafers(table, tmp_path / "t.png", classes=DEFAULT_CLASSES)
    width, _ = _png_size(out)
    assert abs(width - 2 * PANEL_INCHES * DPI) <= 2          # die | truth


def test_render_colours_follow_class_spec(tmp_path):
    """A wafer fully labelled 'ring' must show the ring colour; no die shows white."""
    die = np.full((40, 40), 2, np.uint8)
    die[:, :20] = 0
    label = np.where(die == 2, 1, 0).astype(np.uint8)
    out = render_wafers([die], tmp_path / "c.png", classes=DEFAULT_CLASSES, label_maps=[label])
    pixels = np.asarray(Image.open(out).convert("RGB")).reshape(-1, 3)
    ring = np.array([0x1F, 0x77, 0xB4])
    assert (np.abs(pixels.astype(int) - ring).sum(axis=1) <= 3).sum() > 1000


def test_render_rejects_bad_input(tmp_path):
    die = np.ones((4, 4), np.uint8)
    with pytest.raises(ValueError, match="shape"):
        render_wafers([die], tmp_path / "x.png", classes=DEFAULT_CLASSES, label_maps=[np.zeros((3, 4), np.uint8)])
    with pytest.raises(ValueError, match="class 7"):
        render_wafers([die], tmp_path / "x.png", classes=DEFAULT_CLASSES, predictions=[np.full((4, 4), 7, np.uint8)])
    with pytest.raises(ValueError, match="no wafers"):
        render_wafers([], tmp_path / "x.png", classes=DEFAULT_CLASSES)
    with pytest.raises(ValueError, match="titles"):
        render_wafers([die], tmp_path / "x.png", classes=DEFAULT_CLASSES, titles=["a", "b"])


def test_render_confusion(tmp_path):
    hist = np.array([[900, 10, 0, 0, 5], [3, 40, 0, 1, 0], [0, 0, 0, 0, 0], [2, 0, 1, 30, 0], [1, 0, 0, 0, 20]])
    out = render_confusion(hist, tmp_path / "cm.png", class_names=[c.name for c in DEFAULT_CLASSES])
    width, height = _png_size(out)
    assert 300 < width < 1000 and 300 < height < 1000
    with pytest.raises(ValueError, match="shape"):
        render_confusion(hist[:3, :3], tmp_path / "bad.png", class_names=["a", "b"])


def test_render_curves(tmp_path):
    history = [{"stage": s, "epoch": e, "train_loss": 1.0 / (i + 1), "val_mean_iu": 0.1 * i}
               for i, (s, e) in enumerate([(s, e) for s in ("fcn32s", "fcn16s", "fcn8s") for e in range(3)])]
    history.append({"stage": "fcn8s", "epoch": 3, "train_loss": 0.05})  # no val this epoch
    out = render_curves(history, tmp_path / "curves.png")
    assert _png_size(out) == (1000, 360)
    with pytest.raises(ValueError, match="empty"):
        render_curves([], tmp_path / "none.png")


def test_rendering_does_not_touch_pyplot(tmp_path):
    render_wafers([np.ones((3, 3), np.uint8)], tmp_path / "p.png", classes=DEFAULT_CLASSES)
    if "matplotlib.pyplot" in sys.modules:  # someone else imported it: we must not have opened figures
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []
