"""Tiny real trainings on CPU: staged fine-tuning, checkpoints, resume."""

import math

import numpy as np
import pytest
import torch

from fcn_core.checkpoint import load_checkpoint, load_model
from fcn_core.config import load_config
from fcn_core.data import WaferSet
from fcn_core.synth import generate_wafers
from fcn_core.train import STAGES, build_stage_model, make_optimizer, stages_to_train, train_all_stages, train_stage


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny", {"train.fcn32s.epochs": 2, "train.num_threads": 2})


@pytest.fixture(scope="module")
def sets(cfg):
    ws = WaferSet.from_table(generate_wafers(48, seed=5, synth=cfg.data.synth))
    return ws.subset(range(40)), ws.subset(range(40, 48))


def test_staged_training_chains_checkpoints(cfg, sets, tmp_path):
    records = []
    results = train_all_stages(cfg, train_set=sets[0], val_set=sets[1], out_dir=tmp_path, on_epoch=records.append)
    assert list(results) == list(STAGES)
    assert [r["stage"] for r in records] == ["fcn32s", "fcn32s", "fcn16s", "fcn8s", "fcn4s", "fcn2s", "fcn1s"]
    for r in records:
        assert math.isfinite(r["train_loss"]) and r["wafers_per_s"] > 0 and 0 <= r["val_mean_iu"] <= 1
    # checkpoints are weights_only-safe and carry config + arch
    ckpt = load_checkpoint(results["fcn8s"].best_checkpoint)
    assert ckpt["arch"]["name"] == "fcn8s" and ckpt["config"]["name"] == "tiny"
    model, saved_cfg = load_model(results["fcn8s"].best_checkpoint)
    assert saved_cfg == cfg
    assert model(torch.zeros(1, 3, 37, 29)).shape == (1, cfg.n_classes, 37, 29)
    # FCN-16s started from the best FCN-32s: trunk weights equal before its own training
    m32, _ = load_model(results["fcn32s"].best_checkpoint)
    m16 = build_stage_model(cfg, "fcn16s", results["fcn32s"].best_checkpoint)
    assert torch.equal(m16.conv1_1.weight, m32.conv1_1.weight)
    assert torch.count_nonzero(m16.score_pool4.weight) == 0
    # the die-level end of the cascade, and a config that stops where the paper did
    assert load_checkpoint(results["fcn1s"].best_checkpoint)["arch"]["name"] == "fcn1s"
    def stages(**train) -> tuple[str, ...]:
        return stages_to_train(load_config("tiny", {f"train.{k}": v for k, v in train.items()}))

    assert stages(final_stage="fcn8s") == ("fcn32s", "fcn16s", "fcn8s")
    # epochs 0 skips a stage in between: FCN-1s then starts from FCN-8s
    assert stages(**{"fcn4s.epochs": 0, "fcn2s.epochs": 0}) == ("fcn32s", "fcn16s", "fcn8s", "fcn1s")
    assert stages(**{"fcn32s.epochs": 0, "fcn1s.epochs": 0}) == STAGES  # never the first or the last
    m1 = build_stage_model(cfg, "fcn1s", results["fcn8s"].best_checkpoint)
    assert type(m1).__name__ == "FCN1s" and torch.count_nonzero(m1.score_conv1_2.weight) == 0
    with pytest.raises(ValueError, match="starts from a coarser stage"):
        build_stage_model(cfg, "fcn8s", results["fcn1s"].best_checkpoint)


def test_finetune_stage_continues_the_given_model(cfg, sets, tmp_path):
    first = train_stage(cfg, stage="fcn32s", train_set=sets[0], val_set=sets[1], out_dir=tmp_path)
    start, _ = load_model(first.best_checkpoint)
    tuned = build_stage_model(cfg, "finetune", first.best_checkpoint)
    assert type(tuned) is type(start) and torch.equal(tuned.conv1_1.weight, start.conv1_1.weight)
    two = load_config("tiny", {"train.finetune.epochs": 2, "train.num_threads": 2})
    result = train_stage(two, stage="finetune", train_set=sets[0], val_set=sets[1], out_dir=tmp_path,
                         init_checkpoint=first.best_checkpoint)
    assert [r["stage"] for r in result.history] == ["finetune"] * 2
    assert result.best_epoch == 1  # fine-tuning keeps its last epoch, whatever synthetic validation says
    assert torch.equal(load_checkpoint(result.best_checkpoint)["model"]["conv1_1.weight"],
                       load_checkpoint(result.last_checkpoint)["model"]["conv1_1.weight"])
    assert load_checkpoint(result.last_checkpoint)["arch"]["name"] == "fcn32s"
    with pytest.raises(ValueError, match="init_checkpoint"):
        build_stage_model(cfg, "finetune", None)
    with pytest.raises(ValueError, match="unknown stage 'fcn64s'"):
        train_stage(cfg, stage="fcn64s", train_set=sets[0], val_set=sets[1], out_dir=tmp_path)


def test_resume_continues_an_interrupted_stage(cfg, sets, tmp_path):
    two_epochs = load_config("tiny", {"train.fcn32s.epochs": 2, "train.num_threads": 2})
    one_epoch = load_config("tiny", {"train.fcn32s.epochs": 1, "train.num_threads": 2})
    # "interrupted" after epoch 1 of 2: same run, killed before its second epoch
    first = train_stage(one_epoch, stage="fcn32s", train_set=sets[0], val_set=sets[1], out_dir=tmp_path)
    assert len(first.history) == 1
    seen = []
    resumed = train_stage(two_epochs, stage="fcn32s", train_set=sets[0], val_set=sets[1], out_dir=tmp_path,
                          on_epoch=seen.append)
    assert [r["epoch"] for r in seen] == [1]                  # only the missing epoch ran
    assert [r["epoch"] for r in resumed.history] == [0, 1]    # history carried over
    assert load_checkpoint(resumed.last_checkpoint)["epoch"] == 1
    # a finished stage resumes to a no-op
    again = train_stage(two_epochs, stage="fcn32s", train_set=sets[0], val_set=sets[1], out_dir=tmp_path,
                        on_epoch=seen.append)
    assert len(seen) == 1 and again.best_epoch == resumed.best_epoch


def test_wrong_init_checkpoint_is_rejected(cfg, sets, tmp_path):
    r = train_stage(load_config("tiny", {"train.fcn32s.epochs": 0}), stage="fcn32s", train_set=sets[0],
                    val_set=sets[1], out_dir=tmp_path)
    skipped = build_stage_model(cfg, "fcn8s", r.best_checkpoint)  # 16s skipped: its skip starts at zero
    assert type(skipped).__name__ == "FCN8s" and torch.count_nonzero(skipped.score_pool4.weight) == 0
    zero = load_config("tiny", {"train.fcn8s.epochs": 0})
    r8 = train_stage(zero, stage="fcn8s", train_set=sets[0], val_set=sets[1], out_dir=tmp_path,
                     init_checkpoint=r.best_checkpoint)
    with pytest.raises(ValueError, match="fcn16s starts from a coarser stage"):
        build_stage_model(cfg, "fcn16s", r8.best_checkpoint)


def _first_step_change(sets, tmp_path, **train) -> float:
    """L2 norm of the parameter change made by one plain SGD step of lr 1 (one batch: one padded size)."""
    cfg = load_config("tiny", {"data.pad_fixed": 64, "train.optimizer": "sgd", "train.momentum": 0.0,
                               "train.weight_decay": 0.0, "train.augment": False,
                               "train.num_threads": 2, "train.max_wafers_per_epoch": 16, "train.grad_clip_norm": None,
                               "train.fcn32s": {"epochs": 1, "lr": 1.0, "batch_size": 16},
                               **{f"train.{k}": v for k, v in train.items()}})
    torch.manual_seed(cfg.train.seed)  # train_stage seeds FCN-32s with train.seed: the same initial weights
    before = build_stage_model(cfg, "fcn32s", None).state_dict()
    result = train_stage(cfg, stage="fcn32s", train_set=sets[0], val_set=sets[1], out_dir=tmp_path, progress=False)
    model, _ = load_model(result.last_checkpoint)
    after = model.state_dict()
    return float(torch.sqrt(sum(((after[k] - before[k]).double() ** 2).sum() for k in before)))


def test_grad_clip_norm_bounds_the_step(sets, tmp_path):
    free = _first_step_change(sets, tmp_path / "free")
    clipped = _first_step_change(sets, tmp_path / "clipped", grad_clip_norm=0.01)
    assert free > 0.1                            # the unclipped gradient is far longer than the clip
    assert clipped == pytest.approx(0.01, rel=1e-3)  # so the step is exactly the clip's length


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_weight_decay_shrinks_kernels_only(optimizer):
    """With zero gradients a step is pure weight decay: kernels (ndim >= 2) shrink by lr * decay, while
    biases and BatchNorm scales and shifts stay exactly as they were."""
    cfg = load_config("tiny", {"model.batch_norm": True, "train.optimizer": optimizer, "train.momentum": 0.0,
                               "train.weight_decay": 0.1})
    torch.manual_seed(0)
    model = build_stage_model(cfg, "fcn8s", None)
    with torch.no_grad():  # BatchNorm starts at scale 1, shift 0: make them non-trivial to see any decay
        for p in model.parameters():
            if p.ndim < 2:
                p.uniform_(0.5, 1.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer_ = make_optimizer(cfg, model, lr=0.5)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer_.step()
    after = dict(model.named_parameters())
    scales = [n for n in before if n.startswith("bn") and n.endswith(".weight")]
    assert scales and all(torch.equal(after[n], before[n]) for n in scales)
    assert all(torch.equal(after[n], before[n]) for n in before if n.endswith("bias"))
    kernels = [n for n in before if before[n].ndim >= 2]
    assert {n.rsplit(".", 1)[0] for n in kernels} >= {"conv1_1", "fc6", "score_fr", "upscore2"}
    for n in kernels:  # decoupled (AdamW) and coupled (SGD) decay agree on a zero gradient: p *= 1 - lr * wd
        torch.testing.assert_close(after[n], before[n] * (1 - 0.5 * 0.1))


def test_weight_decay_groups_without_batch_norm_are_the_biases():
    """Without BatchNorm (the demo's model) the rank rule leaves exactly the biases undecayed."""
    cfg = load_config("tiny")
    model = build_stage_model(cfg, "fcn1s", None)
    groups = make_optimizer(cfg, model, lr=1e-3).param_groups
    undecayed = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert undecayed == {id(p) for n, p in model.named_parameters() if n.endswith("bias")}
    assert sorted(g["weight_decay"] for g in groups) == [0.0, cfg.train.weight_decay]


# -- joint training on real maps with wafer-level labels (weak_labels: wafer_labels) ------------------
def test_joint_input_pads_both_batches_with_no_die_and_keeps_their_content_top_left():
    from fcn_core.padding import collate
    from fcn_core.train import joint_input

    rng = np.random.default_rng(0)
    small = collate([rng.integers(0, 3, (5, 7)).astype(np.uint8)] * 2, None, multiple=8).x  # (2, 3, 8, 8)
    tall = collate([rng.integers(0, 3, (20, 6)).astype(np.uint8)], None, multiple=8).x  # (1, 3, 24, 8)
    wide = collate([rng.integers(0, 3, (6, 30)).astype(np.uint8)] * 3, None, multiple=8).x  # (3, 3, 8, 32)
    both = joint_input(tall, wide)
    assert both.shape == (4, 3, 24, 32) and both.dtype == tall.dtype
    assert torch.equal(both[:1, :, :24, :8], tall) and torch.equal(both[1:, :, :8, :32], wide)
    # padding is 'no die' (channel 0 hot), right of the tall maps and below the wide ones
    assert (both[:1, 0, :, 8:] == 1).all() and (both[:1, 1:, :, 8:] == 0).all()
    assert (both[1:, 0, 8:, :] == 1).all() and (both[1:, 1:, 8:, :] == 0).all()
    assert torch.equal(both.sum(1), torch.ones(4, 24, 32))  # still one-hot everywhere
    assert torch.equal(joint_input(small, small), torch.cat([small, small]))  # same shape: just stacked
    assert torch.equal(joint_input(small, tall)[:2, :, :8, :8], small)


def test_stage_logits_score_each_batch_at_its_own_shape_unless_one_pass_is_asked():
    from fcn_core.padding import collate
    from fcn_core.train import joint_input, stage_logits

    cfg = load_config("tiny")
    net = build_stage_model(cfg, "fcn8s", None).eval()
    rng = np.random.default_rng(0)
    x = collate([rng.integers(0, 3, (20, 25)).astype(np.uint8)] * 2, None, multiple=32).x  # (2, 3, 32, 32)
    real = collate([rng.integers(0, 3, (50, 40)).astype(np.uint8)] * 3, None, multiple=32).x  # (3, 3, 64, 64)
    with torch.no_grad():
        logits, real_logits = stage_logits(net, x, real, one_pass=False)
        close = dict(rtol=1e-4, atol=1e-5)  # channels_last kernels round differently
        assert torch.allclose(logits, net(x), **close) and torch.allclose(real_logits, net(real), **close)
        assert stage_logits(net, x, None, one_pass=True)[1] is None
        logits, real_logits = stage_logits(net, x, real, one_pass=True)  # DDP: one forward over both
        joint = net(joint_input(x, real))
    assert logits.shape == (2, cfg.n_classes, 32, 32) and real_logits.shape == (3, cfg.n_classes, 64, 64)
    assert torch.allclose(logits, joint[:2, :, :32, :32], **close) and torch.allclose(real_logits, joint[2:], **close)


def _weak_set(cfg, *, fails: bool = True, masks: str | None = None):
    """Seven real-like maps with dataset labels (mixes too); ``fails=False``: the same maps, sizes and
    labels with every fail die made a pass die, so the weak loss is zero and teaches nothing.
    ``masks``: pseudo-masks too (``weak_labels: both``): ``"taught"`` every fail die its wafer's first
    labelled pattern, ``"ignored"`` every fail die ignored (the cross-entropy then has nothing to teach)."""
    from fcn_core.table import FAIL, PASS, die_maps, make_table
    from fcn_core.weak import IGNORE_LABEL, label_patterns
    from fcn_core.weak_loss import WeakSet

    maps = die_maps(generate_wafers(6, seed=9, synth=cfg.data.synth))
    big = np.full((50, 50), PASS, np.uint8)  # a real map larger than every synthetic one: pads them
    big[np.random.default_rng(1).random(big.shape) < 0.2] = FAIL
    maps = [m if fails else np.where(m == FAIL, PASS, m).astype(np.uint8) for m in [*maps, big]]
    labels = ["Edge-Ring", "None", "Center+Scratch", "Scratch", "Random", "Loc", "Donut+Edge-Ring"]
    label_maps = None
    if masks is not None:
        patterns = label_patterns(make_table(wafer_ids=["x"] * 7, die_maps=maps, wafer_labels=labels), cfg.class_names)
        label_maps = [np.where(m == FAIL, min(p, default=0) if masks == "taught" else IGNORE_LABEL, 0).astype(np.uint8)
                      for m, p in zip(maps, patterns)]
    table = make_table(wafer_ids=[f"r{i}" for i in range(7)], die_maps=maps, label_maps=label_maps,
                       wafer_labels=labels)
    return WeakSet.from_table(table, cfg.class_names)


def _one_joint_epoch(sets, out_dir, weak) -> dict[str, torch.Tensor]:
    """The weights after one short epoch of FCN-32s with ``weak`` real maps beside the synthetic ones."""
    result = train_stage(_joint_cfg(), stage="fcn32s", train_set=sets[0], val_set=sets[1], out_dir=out_dir,
                         progress=False, weak_set=weak)
    assert len(result.history) == 1 and math.isfinite(result.history[0]["train_loss"])
    return load_checkpoint(result.last_checkpoint)["model"]


def _joint_cfg():
    return load_config("tiny", {"train.fcn32s.epochs": 1, "train.num_threads": 2, "train.max_wafers_per_epoch": 8,
                                "train.fcn32s.batch_size": 4})


def test_training_with_a_weak_set_runs_and_learns_from_it(sets, tmp_path):
    cfg = _joint_cfg()
    with_weak = _one_joint_epoch(sets, tmp_path / "joint", _weak_set(cfg))
    # the control runs the very same steps (same real maps, shapes and padding in every forward) but
    # its real maps have no fail die, so their loss is a zero: any difference is the weak loss's doing
    blank = _weak_set(cfg, fails=False)
    control = _one_joint_epoch(sets, tmp_path / "control", blank)
    control_again = _one_joint_epoch(sets, tmp_path / "control-again", blank)
    assert all(torch.equal(control[k], control_again[k]) for k in control)  # same seed, same run
    assert any(not torch.equal(with_weak[k], control[k]) for k in control)  # so the real maps taught it


def test_pseudo_masks_on_the_real_maps_add_a_die_loss_that_teaches(sets, tmp_path):
    """weak_labels: both: the same steps with masks that teach every fail die, vs masks that ignore them all."""
    taught, ignored, unmasked = (_one_joint_epoch(sets, tmp_path / (m or "none"), _weak_set(_joint_cfg(), masks=m))
                                 for m in ("taught", "ignored", None))
    assert all(torch.equal(ignored[k], unmasked[k]) for k in unmasked)  # all-ignored masks: the wafer loss alone
    assert any(not torch.equal(taught[k], unmasked[k]) for k in unmasked)  # so the masks' cross-entropy taught it


def _redraw_cfg(epochs: int = 3):
    return load_config("tiny", {"train.fcn32s.epochs": epochs, "train.num_threads": 2,
                                "train.max_wafers_per_epoch": 8, "train.fcn32s.batch_size": 4,
                                "train.finetune.pseudo_refresh_after": 0.5})


class _Interrupt(Exception):
    pass


def test_pseudo_masks_are_redrawn_once_mid_stage_and_a_resumed_stage_redraws_the_same(sets, tmp_path, monkeypatch):
    from fcn_core.weak_loss import WeakSet

    drawn = []
    redrawn = WeakSet.redrawn

    def spy(self, model, **kw):
        out = redrawn(self, model, **kw)
        drawn.append(out[0].wafers.label)
        return out

    monkeypatch.setattr(WeakSet, "redrawn", spy)
    cfg = _redraw_cfg()  # 3 epochs: redrawn after int(3 * 0.5) = 1
    weak = _weak_set(cfg, masks="taught")
    full = train_stage(cfg, stage="fcn32s", train_set=sets[0], val_set=sets[1], out_dir=tmp_path / "full",
                       progress=False, weak_set=weak)
    assert len(drawn) == 1 and "pseudo_redrawn_dies_pattern" in full.history[0]
    assert not any(k.startswith("pseudo_") for r in full.history[1:] for k in r)
    taught = {k[len("pseudo_redrawn_dies_"):]: v for k, v in full.history[0].items() if k.startswith("pseudo_")}
    assert sum(taught.values()) == sum(int((d == 2).sum()) for d in weak.wafers.die)  # every fail die, once
    assert load_checkpoint(tmp_path / "full" / "fcn32s" / "pseudo_source.pt")["epoch"] == 0
    # the masks the later epochs train on are the new ones: they differ from the hand-made first masks
    assert any(not np.array_equal(a, b) for a, b in zip(drawn[0], weak.wafers.label))

    def stop_after_second(record):
        if record["epoch"] == 1:
            raise _Interrupt

    with pytest.raises(_Interrupt):  # killed after epoch 2 of 3, past the redraw
        train_stage(cfg, stage="fcn32s", train_set=sets[0], val_set=sets[1], out_dir=tmp_path / "cut",
                    progress=False, weak_set=weak, on_epoch=stop_after_second)
    resumed = train_stage(cfg, stage="fcn32s", train_set=sets[0], val_set=sets[1], out_dir=tmp_path / "cut",
                          progress=False, weak_set=weak)  # the first masks again: the stage redraws them itself
    assert len(drawn) == 3 and all(np.array_equal(a, b) for a, b in zip(drawn[2], drawn[0]))
    assert [r["epoch"] for r in resumed.history] == [0, 1, 2]
    want, got = load_checkpoint(full.last_checkpoint)["model"], load_checkpoint(resumed.last_checkpoint)["model"]
    assert all(torch.equal(want[k], got[k]) for k in want)  # as if never interrupted


def test_a_stage_without_masks_or_with_the_redraw_off_never_redraws(sets, tmp_path):
    for name, cfg, weak in [("labels-only", _redraw_cfg(2), _weak_set(_redraw_cfg(2))),
                            ("off", load_config("tiny", {"train.fcn32s.epochs": 2, "train.num_threads": 2,
                                                         "train.max_wafers_per_epoch": 8,
                                                         "train.finetune.pseudo_refresh_after": None}),
                             _weak_set(_redraw_cfg(2), masks="taught"))]:
        result = train_stage(cfg, stage="fcn32s", train_set=sets[0], val_set=sets[1], out_dir=tmp_path / name,
                             progress=False, weak_set=weak)
        assert len(result.history) == 2 and not any(k.startswith("pseudo_") for r in result.history for k in r)
        assert not (tmp_path / name / "fcn32s" / "pseudo_source.pt").exists()
