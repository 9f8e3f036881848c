"""Training of one FCN stage, and the staged cascade FCN-32s -> 16s -> 8s -> ... -> FCN-1s.

No orchestration or tracking imports here: progress leaves through the ``on_epoch`` callback
(the Prefect task turns it into MLflow metrics). Runs on CPU or CUDA, single process or under
``torchrun`` (DistributedDataParallel: every rank walks the same seeded bucket order and takes
its share of each batch, so a DDP step sees the same wafers as a single-process step).
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from fcn_core.checkpoint import load_checkpoint, load_model, model_state, save_checkpoint
from fcn_core.config import Config
from fcn_core.data import WaferSet, balanced_class_weights, class_frequencies, prefetch
from fcn_core.evaluate import evaluate
from fcn_core.models import build_fcn, from_coarser, load_vgg16_imagenet
from fcn_core.padding import IGNORE_INDEX, Batch, size_buckets
from fcn_core.inference.runtime import autocast_for, resolve_device
from fcn_core.stages import FINETUNE, STAGES
from fcn_core.weak import LineSeed
from fcn_core.weak_loss import WeakSet, weak_map_loss

__all__ = ["FINETUNE", "STAGES"]  # re-exported: flows, bench and launch import them from here


def stages_to_train(cfg: Config) -> tuple[str, ...]:
    """FCN-32s up to ``train.final_stage`` (the seed's cascade ends at fcn8s).

    A stage in between with ``epochs: 0`` is skipped: the next one starts from the last trained
    stage, its untrained skips at zero (e.g. FCN-8s -> FCN-1s).
    """
    cascade = STAGES[:STAGES.index(cfg.train.final_stage) + 1]
    return tuple(s for s in cascade if s in (cascade[0], cascade[-1]) or cfg.train.stage(s).epochs > 0)

EpochCallback = Callable[[dict], None]


@dataclass
class StageResult:
    stage: str
    best_checkpoint: str
    last_checkpoint: str
    best_epoch: int
    best_val_mean_iu: float
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    wafers_per_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


# -- distributed helpers -------------------------------------------------------------------------
@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size())


def stage_device(cfg: Config) -> torch.device:
    device = resolve_device(cfg.train.device)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


# -- building blocks -------------------------------------------------------------------------
def build_stage_model(cfg: Config, stage: str, init_checkpoint: str | None) -> nn.Module:
    """FCN-32s from scratch (or ImageNet VGG16); every finer stage from the previous stage's best weights."""
    if stage == FINETUNE:
        if init_checkpoint is None:
            raise ValueError("fine-tuning starts from a trained model: pass init_checkpoint")
        model, _ = load_model(init_checkpoint)
        return model.train()
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {(*STAGES, FINETUNE)}")
    if stage == "fcn32s" or init_checkpoint is None:
        model = build_fcn(stage, n_classes=cfg.n_classes, preset=cfg.model.preset, geometry=cfg.model.geometry,
                          batch_norm=cfg.model.batch_norm)
        if cfg.model.imagenet_weights:
            load_vgg16_imagenet(model, cfg.model.imagenet_weights)
        return model
    previous, _ = load_model(init_checkpoint)
    if previous.arch["name"] not in STAGES[:STAGES.index(stage)]:
        raise ValueError(f"{stage} starts from a coarser stage, but {init_checkpoint} holds {previous.arch['name']}")
    return from_coarser(stage, previous)


def make_optimizer(cfg: Config, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW or SGD over two groups: weight decay on weight matrices and kernels (``ndim >= 2``) only.

    Biases and BatchNorm scales and shifts (vectors) are not decayed: shrinking a scale towards zero
    does not regularise the function, it just fights the normalisation (nanoGPT's rule by rank).
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.train.momentum)
    return torch.optim.AdamW(groups, lr=lr)


def warmup_cosine(total_steps: int, *, warmup: int, floor: float = 0.02) -> Callable[[int], float]:
    """LR multiplier: linear warm-up, then cosine decay to ``floor``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def stage_class_weights(cfg: Config, train_set: WaferSet) -> torch.Tensor | None:
    spec = cfg.train.class_weights
    if spec == "none":
        return None
    if spec == "auto":
        return torch.from_numpy(balanced_class_weights(class_frequencies(train_set, cfg.n_classes)))
    if len(spec) != cfg.n_classes:
        raise ValueError(f"train.class_weights has {len(spec)} values for {cfg.n_classes} classes")
    return torch.tensor(spec, dtype=torch.float32)


def _epoch_wafers(cfg: Config, train_set: WaferSet, seed: int) -> WaferSet:
    """The wafers of one epoch: all of them, or a seeded random subset of max_wafers_per_epoch."""
    limit = cfg.train.max_wafers_per_epoch
    if limit and limit < len(train_set):
        pick = np.random.default_rng(seed).choice(len(train_set), size=limit, replace=False)
        return train_set.subset(sorted(pick.tolist()))
    return train_set


def _count_steps(cfg: Config, wafers: WaferSet, batch_size: int, info: DistInfo) -> int:
    buckets = size_buckets(wafers.heights, wafers.widths, batch_size=batch_size,
                           multiple=cfg.data.pad_multiple, fixed=cfg.data.pad_fixed)
    return sum(1 for b in buckets if len(b) >= info.world_size)


def _epoch_batches(cfg: Config, wafers: WaferSet, batch_size: int, seed: int, info: DistInfo,
                   device: torch.device) -> Iterator[tuple[list[int], Batch]]:
    """Shuffled, augmented, size-bucketed batches; under DDP each rank's rows of each batch.

    On CUDA the batches are collated and pinned a few ahead in a background thread, so the GPU does
    not wait on numpy. On CPU they are made in line: a second thread would only take a core from
    the convolutions (and the order, hence the run, is the same either way).
    """
    batches = _rank_batches(cfg, wafers, batch_size, seed, info)
    if device.type == "cuda":
        return prefetch(batches, depth=4, prepare=lambda item: (item[0], item[1].pin_memory()))
    return batches


def _rank_batches(cfg: Config, wafers: WaferSet, batch_size: int, seed: int,
                  info: DistInfo) -> Iterator[tuple[list[int], Batch]]:
    for idx, batch in wafers.batches(batch_size=batch_size, multiple=cfg.data.pad_multiple, fixed=cfg.data.pad_fixed,
                                     shuffle=True, seed=seed, augment=cfg.train.augment):
        if info.world_size > 1:
            if len(idx) < info.world_size:
                continue  # every rank must take part in every step
            rows = list(range(info.rank, len(idx), info.world_size))
            batch = Batch(x=batch.x[rows], die=batch.die[rows],
                          target=None if batch.target is None else batch.target[rows],
                          sizes=[batch.sizes[r] for r in rows])
            idx = [idx[r] for r in rows]
        yield idx, batch


def stage_logits(net: nn.Module, x: torch.Tensor, real_x: torch.Tensor | None, *,
                 one_pass: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scores of the synthetic batch ``x`` and of the real batch ``real_x`` (None: no real maps).

    One process: two passes, each batch at its own padded shape, as it will be scored (a 32 x 32
    synthetic batch beside 64 x 64 real maps is not padded to 64 x 64: a quarter of the work).
    ``one_pass`` (DDP, which wants one forward per step): both padded to one shape by
    :func:`joint_input`, each part cropped back to its own shape."""
    if real_x is None or not one_pass:
        with autocast_for(x.device):
            logits = net(x.contiguous(memory_format=torch.channels_last))
            real_logits = None if real_x is None else net(real_x.contiguous(memory_format=torch.channels_last))
        return logits, real_logits
    with autocast_for(x.device):
        logits = net(joint_input(x, real_x).contiguous(memory_format=torch.channels_last))
    n, (h, w), (rh, rw) = len(x), x.shape[-2:], real_x.shape[-2:]
    return logits[:n, :, :h, :w], logits[n:, :, :rh, :rw]


def joint_input(x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Two one-hot batches (N, 3, H, W) stacked into one, each padded to the larger height and width
    with 'no die' (channel 0), as collate pads; a model's scores on each map's own cells keep their
    meaning, so crop each part back to its own (H, W)."""
    H, W = max(x.shape[-2], other.shape[-2]), max(x.shape[-1], other.shape[-1])

    def padded(t: torch.Tensor) -> torch.Tensor:
        if t.shape[-2:] == (H, W):
            return t
        out = t.new_zeros((t.shape[0], t.shape[1], H, W))
        out[:, 0] = 1.0
        out[:, :, :t.shape[-2], :t.shape[-1]] = t
        return out
    return torch.cat([padded(x), padded(other)])


class _Progress:
    """A rich progress bar on a terminal; one line per epoch in logs (Prefect, CI)."""

    def __init__(self, enabled: bool, title: str):
        self.bar = None
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=True)
            self.bar.start()
        self.title = title
        self.task = None

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        if self.bar is not None:
            self.task = self.bar.add_task(f"{self.title} epoch {epoch + 1}/{epochs}", total=steps, info="")

    @property
    def active(self) -> bool:
        return self.bar is not None

    def step(self, loss: float, wafers_per_s: float) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, advance=1, info=f"loss {loss:.4f}  {wafers_per_s:.0f} wafers/s")

    def end_epoch(self, record: dict, epochs: int) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.remove_task(self.task)
        print(f"[{self.title}] epoch {record['epoch'] + 1}/{epochs}  loss {record['train_loss']:.4f}  "
              f"val mean IU (fail dies) {record['val_mean_iu']:.4f}  {record['wafers_per_s']:.0f} wafers/s",
              flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# -- the stage ---------------------------------------------------------------------------------
def train_stage(
    cfg: Config,
    *,
    stage: str,
    train_set: WaferSet,
    val_set: WaferSet,
    out_dir: str | Path,
    init_checkpoint: str | None = None,
    resume: bool = True,
    on_epoch: EpochCallback | None = None,
    progress: bool = True,
    weak_set: WeakSet | None = None,
) -> StageResult:
    """Train one stage; checkpoints every epoch to ``out_dir/<stage>/{last,best}.pt``.

    ``weak_set``: real maps with wafer-level labels, trained jointly (``weak_labels: wafer_labels``
    or ``both``): every step adds one batch of them under ``fcn_core.weak_loss.weak_map_loss`` (plus,
    when the set carries pseudo-masks, the die cross-entropy on them), weighted by
    ``train.finetune.real_weight``, to the synthetic batch's die-level loss (:func:`stage_logits`).

    A set with pseudo-masks has them drawn again from the model being trained once, after
    ``train.finetune.pseudo_refresh_after`` of the epochs (:func:`_redraw_masks`).

    With ``resume`` an interrupted stage continues from ``last.pt`` (model, optimiser, schedule,
    RNG and history); the best epoch by validation mean IU on fail dies is kept in ``best.pt`` (for
    ``finetune``: the last epoch).
    """
    train_set.require_labels("training")
    val_set.require_labels("validation")
    stage_cfg = cfg.train.stage(stage)
    device = stage_device(cfg)
    info = init_distributed(device)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    seed = cfg.train.seed + 1000 * (STAGES + (FINETUNE,)).index(stage)
    torch.manual_seed(seed)

    stage_dir = Path(out_dir) / stage
    last_path, best_path = stage_dir / "last.pt", stage_dir / "best.pt"
    model = build_stage_model(cfg, stage, init_checkpoint).to(device)
    # channels_last pays on CPU (oneDNN) as well as CUDA (training-step speed-ups: docs/performance.md)
    model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model, stage_cfg.lr)
    steps_per_epoch = max(1, _count_steps(cfg, _epoch_wafers(cfg, train_set, seed), stage_cfg.batch_size, info))
    total_steps = steps_per_epoch * max(1, stage_cfg.epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_steps, warmup=min(50, max(1, total_steps // 10))))
    weights = stage_class_weights(cfg, train_set)
    loss_fn = nn.CrossEntropyLoss(weight=None if weights is None else weights.to(device), ignore_index=IGNORE_INDEX)

    start_epoch, history, best_score, best_epoch = 0, [], -math.inf, -1
    if resume and last_path.exists():
        state = load_checkpoint(last_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
        start_epoch, history = state["epoch"] + 1, list(state["history"])
        best_score, best_epoch = state["best_val_mean_iu"], state["best_epoch"]
        if info.is_main:
            print(f"[{stage}] resuming from {last_path} at epoch {start_epoch + 1}", flush=True)

    has_masks = weak_set is not None and weak_set.has_masks
    redraw_after = cfg.train.finetune.refresh_epoch_of(stage_cfg.epochs) if has_masks else None
    source_path = stage_dir / PSEUDO_SOURCE_FILE
    if redraw_after is not None and start_epoch >= redraw_after:
        # Resumed past the redraw: draw from the weights the interrupted run drew from, as it did.
        source = copy.deepcopy(model)  # not a new model: building one would draw from the restored RNG
        source.load_state_dict(load_checkpoint(source_path, map_location=device)["model"])
        weak_set, _ = _redraw_masks(cfg, weak_set, source, device)

    net: nn.Module = model
    if info.world_size > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def checkpoint(epoch: int) -> dict:
        return {"stage": stage, "arch": dict(model.arch), "config": cfg.to_dict(), "model": model_state(model),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": None,
                "rng_cpu": torch.get_rng_state(), "epoch": epoch, "history": history,
                "best_val_mean_iu": best_score, "best_epoch": best_epoch}

    bar = _Progress(progress and info.is_main, stage)
    train_seconds, wafers_seen = 0.0, 0
    try:
        for epoch in range(start_epoch, stage_cfg.epochs):
            net.train()
            wafers = _epoch_wafers(cfg, train_set, seed + epoch)
            batches = _epoch_batches(cfg, wafers, stage_cfg.batch_size, seed + epoch, info, device)
            bar.start_epoch(epoch, stage_cfg.epochs, _count_steps(cfg, wafers, stage_cfg.batch_size, info))
            t0, epoch_wafers, loss_sum, loss_n = time.perf_counter(), 0, 0.0, 0
            real_batches = None if weak_set is None else weak_set.endless_batches(
                batch_size=stage_cfg.batch_size, seed=seed + epoch + 7919 * info.rank, multiple=cfg.data.pad_multiple,
                fixed=cfg.data.pad_fixed, augment=cfg.train.augment)
            for idx, batch in batches:
                target = batch.target
                if not bool((target != IGNORE_INDEX).any()) and info.world_size == 1:
                    continue  # no fail dies in this batch: nothing to learn, and CE would be NaN
                x = batch.x.to(device, non_blocking=True)
                target = target.to(device, non_blocking=True)
                real = None if real_batches is None else next(real_batches)
                real_x = None if real is None else real[0].x.to(device, non_blocking=True)
                logits, real_logits = stage_logits(net, x, real_x, one_pass=info.world_size > 1)
                loss = loss_fn(logits.float(), target)
                if info.world_size > 1:  # an all-ignored shard (NaN loss) must still join the step
                    loss = torch.where(torch.isfinite(loss), loss, logits.sum() * 0.0)
                if real is not None:
                    real_batch, allowed, present = real
                    real_loss = weak_map_loss(
                        real_logits, real_batch.die.to(device), allowed.to(device), present.to(device),
                        top_k=cfg.train.finetune.presence_top_k, presence_weight=cfg.train.finetune.presence_weight)
                    if real_batch.target is not None and bool((real_batch.target != IGNORE_INDEX).any()):
                        real_loss = real_loss + loss_fn(real_logits.float(), real_batch.target.to(device))
                    loss = loss + cfg.train.finetune.real_weight * real_loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.train.grad_clip_norm is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip_norm)
                optimizer.step()
                scheduler.step()
                loss_sum = loss_sum + loss.detach()  # a tensor: no GPU sync per step
                loss_n += 1
                epoch_wafers += len(idx)
                if bar.active:
                    bar.step(float(loss_sum) / loss_n, epoch_wafers / max(1e-9, time.perf_counter() - t0))
            loss_sum = float(loss_sum)
            epoch_seconds = time.perf_counter() - t0
            if info.world_size > 1:  # report the loss over all ranks, not rank 0's share
                totals = torch.tensor([loss_sum, loss_n], dtype=torch.float64, device=device)
                dist.all_reduce(totals)
                loss_sum, loss_n = float(totals[0]), int(totals[1])
            train_seconds += epoch_seconds
            wafers_seen += epoch_wafers * info.world_size
            val = evaluate(model, val_set, n_classes=cfg.n_classes, device=device,
                           batch_size=max(64, stage_cfg.batch_size), multiple=cfg.data.pad_multiple,
                           fixed=cfg.data.pad_fixed)
            record = {
                "stage": stage, "epoch": epoch, "train_loss": loss_sum / max(1, loss_n),
                "lr": optimizer.param_groups[0]["lr"], "val_mean_iu": val.fail_only["mean_iu"],
                "val_pixel_acc": val.fail_only["pixel_acc"], "val_mean_acc": val.fail_only["mean_acc"],
                "val_fw_iu": val.fail_only["fw_iu"], "val_on_wafer_mean_iu": val.on_wafer["mean_iu"],
                "wafers_per_s": epoch_wafers * info.world_size / max(1e-9, epoch_seconds),
                "epoch_seconds": epoch_seconds,
            }
            if redraw_after is not None and epoch + 1 == redraw_after:
                if info.is_main:
                    save_checkpoint(source_path, {"stage": stage, "epoch": epoch, "model": model_state(model)})
                weak_set, taught = _redraw_masks(cfg, weak_set, model, device)
                record.update({f"pseudo_redrawn_dies_{key}": value for key, value in taught.items()})
                if info.is_main:
                    print(f"[{stage}] pseudo-masks redrawn from epoch {epoch + 1}: fail dies {taught}", flush=True)
            history.append(record)
            improved = not math.isnan(record["val_mean_iu"]) and record["val_mean_iu"] > best_score
            if stage == FINETUNE:  # its aim is real maps, which synthetic validation cannot judge: keep the last
                improved = True
            if improved:
                best_score, best_epoch = record["val_mean_iu"], epoch
            if info.is_main:
                state = checkpoint(epoch)
                save_checkpoint(last_path, state)
                if improved:
                    save_checkpoint(best_path, state)
                bar.end_epoch(record, stage_cfg.epochs)
                if on_epoch is not None:
                    on_epoch(record)
    finally:
        bar.close()

    if info.is_main and not best_path.exists():
        # Zero epochs (or NaN scores throughout): keep the weights we have so later stages can start.
        save_checkpoint(best_path, checkpoint(-1))
        if not last_path.exists():
            save_checkpoint(last_path, checkpoint(-1))
    if info.world_size > 1:
        dist.barrier()
    return StageResult(
        stage=stage, best_checkpoint=str(best_path), last_checkpoint=str(last_path), best_epoch=best_epoch,
        best_val_mean_iu=float(best_score) if best_score != -math.inf else float("nan"), history=history,
        seconds=train_seconds, wafers_per_s=wafers_seen / train_seconds if train_seconds else 0.0,
    )


PSEUDO_SOURCE_FILE = "pseudo_source.pt"  # the weights a stage's pseudo-masks were redrawn from (for resume)


def _redraw_masks(cfg: Config, weak_set: WeakSet, model: nn.Module,
                  device: torch.device) -> tuple[WeakSet, dict[str, int]]:
    """Self-training: the real maps' pseudo-masks drawn again from ``model`` by the same rule as the
    first ones (``train.finetune.pseudo_min_prob``, ``pseudo_line_seed``). Once, mid-stage: the model
    has learnt from the first masks by then (MixedWM38 exact-set +0.06-0.09 measured, docs/real-data.md);
    every other epoch drifted (ring F1 fell)."""
    ft = cfg.train.finetune
    return weak_set.redrawn(model, min_prob=ft.pseudo_min_prob,
                            line_seed=LineSeed.from_config(ft.pseudo_line_seed, cfg.class_names),
                            device=device, multiple=cfg.data.pad_multiple, fixed=cfg.data.pad_fixed)


def train_all_stages(
    cfg: Config,
    *,
    train_set: WaferSet,
    val_set: WaferSet,
    out_dir: str | Path,
    resume: bool = True,
    on_epoch: EpochCallback | None = None,
) -> dict[str, StageResult]:
    """FCN-32s, then FCN-16s from the best 32s, FCN-8s from the best 16s, ... up to train.final_stage."""
    results: dict[str, StageResult] = {}
    init = None
    for stage in stages_to_train(cfg):
        results[stage] = train_stage(cfg, stage=stage, train_set=train_set, val_set=val_set, out_dir=out_dir,
                                     init_checkpoint=init, resume=resume, on_epoch=on_epoch)
        init = results[stage].best_checkpoint
    return results
