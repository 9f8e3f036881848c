"""Training speed at 64 x 64: wafers/s per stage, levers, vgg16 classic, the peer.

- ``train_stage``: the project's own training code (bucketed batches, augmentation, AdamW, warm-up
  cosine schedule, class-weighted loss) for one epoch of synthetic 64 x 64 wafers, per stage;
  validation excluded (``StageResult.wafers_per_s``).
- step-only levers: the same step (forward, loss, backward, optimizer and scheduler step) on
  pre-collated batches, with channels_last / bf16 autocast / sub-pixel upsamplers, per thread count.
- vgg16 classic (the seed's network): a few steps.
- the peer: torchvision fcn_resnet50, same batch and step.
- GPU: measured when CUDA is present, otherwise recorded as not measured.

    python -m bench.training [--wafers 512 --batch 32 --lever-threads 1,2]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

from bench.common import (NO_GPU, base_parser, finish, load_avg, machine_info, print_table, set_threads,
                          synthetic_64, time_best)
from bench.peer import PEER_NAME, PeerFCN
from fcn_core.config import Config, load_config
from fcn_core.data import WaferSet, balanced_class_weights, class_frequencies
from fcn_core.models import build_fcn, forward_gflops
from fcn_core.padding import IGNORE_INDEX, Batch
from fcn_core.inference.fastpath import with_subpixel_upsamplers
from fcn_core.train import STAGES, make_optimizer, train_stage, warmup_cosine

N_CLASSES = 5


def bench_config(batch: int, *, threads: int | None, epochs: int = 1, device: str = "cpu") -> Config:
    overrides = {"train.device": device, "train.num_threads": threads}
    for stage in STAGES:
        overrides[f"train.{stage}.epochs"] = epochs
        overrides[f"train.{stage}.batch_size"] = batch
    return load_config("default", overrides)


def stage_speeds(wafers: WaferSet, *, batch: int, threads_list: list[int], preset: str = "compact",
                 geometry: str = "aligned") -> list[dict]:
    """One epoch of ``train_stage`` per stage (each from scratch: the speed does not depend on init)."""
    rows = []
    val = wafers.subset(range(min(8, len(wafers))))
    for threads in threads_list:
        cfg = bench_config(batch, threads=threads)
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"preset": preset, "geometry": geometry})})
        for stage in STAGES:
            with tempfile.TemporaryDirectory() as tmp:
                load = load_avg()
                result = train_stage(cfg, stage=stage, train_set=wafers, val_set=val, out_dir=tmp, resume=False,
                                     progress=False)
            rows.append({"path": "train_stage", "preset": preset, "geometry": geometry, "stage": stage,
                         "threads": threads, "batch": batch, "wafers": len(wafers),
                         "wafers_per_s": round(result.wafers_per_s, 1), "seconds": round(result.seconds, 2),
                         "load_avg": load})
            print(f"  train_stage {preset} {geometry} {stage} {threads} thr: {result.wafers_per_s:,.0f} wafers/s "
                  f"(load {load})", flush=True)
    return rows


def collated(wafers: WaferSet, batch: int) -> list[Batch]:
    return [b for _, b in wafers.batches(batch_size=batch, shuffle=True, seed=0, augment=True)
            if len(b.sizes) == batch]


def step_fn(model: nn.Module, cfg: Config, weights: torch.Tensor | None, *, channels_last: bool, bf16: bool,
            subpixel: bool, total_steps: int = 1000):
    """The body of train_stage's loop as a function of one batch (same optimizer, schedule, loss)."""
    model.train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    net = with_subpixel_upsamplers(model) if subpixel else model  # same function, conv + pixel shuffle upsamplers
    optimizer = make_optimizer(cfg, model, 1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup=10))
    loss_fn = nn.CrossEntropyLoss(weight=weights, ignore_index=IGNORE_INDEX)

    def step(batch: Batch) -> float:
        x = batch.x.contiguous(memory_format=torch.channels_last) if channels_last else batch.x
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = net(x)
        loss = loss_fn(logits.float(), batch.target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        return float(loss.detach())

    return step


def time_steps(step, batches: list[Batch], *, repeats: int) -> dict:
    """Best-of-N time of one pass over ``batches`` (after one warm-up step)."""
    n = sum(len(b.sizes) for b in batches)
    step(batches[0])  # warm-up: oneDNN primitives, optimizer state
    timing = time_best(lambda: [step(b) for b in batches], repeats=repeats, warmup=0)
    return {"wafers": n, **timing.summary(n)}


LEVERS = (  # name, channels_last, bf16, subpixel
    ("NCHW fp32 (train.py on CPU)", False, False, False),
    ("+ channels_last", True, False, False),
    ("+ sub-pixel upsamplers", True, False, True),
    ("+ bf16 autocast", True, True, True),
)


def step_levers(wafers: WaferSet, *, batch: int, threads_list: list[int], repeats: int, n_batches: int) -> list[dict]:
    cfg = bench_config(batch, threads=None)
    weights = torch.from_numpy(balanced_class_weights(class_frequencies(wafers, N_CLASSES)))
    batches = collated(wafers, batch)[:n_batches]
    rows = []
    for threads in threads_list:
        torch.set_num_threads(threads)
        for stage in STAGES:
            for lever, cl, bf16, sub in LEVERS:
                torch.manual_seed(0)
                model = build_fcn(stage, n_classes=N_CLASSES)
                r = time_steps(step_fn(model, cfg, weights, channels_last=cl, bf16=bf16, subpixel=sub), batches,
                               repeats=repeats)
                rows.append({"path": "step", "preset": "compact", "geometry": "aligned", "stage": stage,
                             "lever": lever, "threads": threads, "batch": batch, **r})
                print(f"  step {stage} {lever:30s} {threads} thr: {r['per_s']:,.0f} wafers/s "
                      f"(cpu {r['per_cpu_s']:,.0f}/s, load {max(r['load_avg'])})", flush=True)
    return rows


def big_models(wafers: WaferSet, *, batch: int, vgg_batch: int, steps: int, repeats: int) -> list[dict]:
    """vgg16 classic FCN-8s (a few steps), the peer and the compact FCN-8s at the peer's batch."""
    cfg = bench_config(batch, threads=None)
    weights = torch.from_numpy(balanced_class_weights(class_frequencies(wafers, N_CLASSES)))
    rows = []
    candidates = [
        ("compact aligned FCN-8s", lambda: build_fcn("fcn8s", n_classes=N_CLASSES), batch, True),
        (PEER_NAME, lambda: PeerFCN(N_CLASSES), batch, False),
        ("vgg16 classic FCN-8s (the seed's net)",
         lambda: build_fcn("fcn8s", n_classes=N_CLASSES, preset="vgg16", geometry="classic"), vgg_batch, True),
    ]
    for name, make, b, sub in candidates:
        batches = collated(wafers, b)[:steps]
        for bf16 in (False, True):
            torch.manual_seed(0)
            model = make()
            gf = forward_gflops(model, 64, 64)
            r = time_steps(step_fn(model, cfg, weights, channels_last=True, bf16=bf16, subpixel=sub), batches,
                           repeats=repeats if b * gf < 50 else 1)
            rows.append({"model": name, "dtype": "bf16" if bf16 else "fp32", "batch": b, "steps": len(batches),
                         "forward_gflop_per_map": round(gf, 3),
                         "train_gflops_per_s": round(3 * gf * r["wafers"] / r["best_s"], 1), **r})
            print(f"  {name} {rows[-1]['dtype']} batch {b}: {r['per_s']:,.1f} wafers/s", flush=True)
    ours = {r["dtype"]: r for r in rows if r["model"] == "compact aligned FCN-8s"}
    for r in rows:
        if r["model"] == PEER_NAME:
            ours[r["dtype"]]["speed_ratio_vs_peer"] = round(ours[r["dtype"]]["per_s"] / r["per_s"], 1)
    return rows


GPU_RUNS = (  # preset, geometry, batch: the compact default at two batch sizes, the seed's vgg16 net
    ("compact", "aligned", 128), ("compact", "aligned", 512), ("vgg16", "classic", 64), ("vgg16", "classic", 256))


def gpu_rows(*, n_wafers: int, stages: tuple[str, ...] = ("fcn32s", "fcn8s", "fcn1s")) -> dict | str:
    """``train_stage`` on CUDA (bf16 autocast, channels_last, pinned batches prefetched by a thread).

    Two epochs per run; the second epoch's wafers/s is reported (the first pays cuDNN's autotuning
    and the allocator's growth).
    """
    if not torch.cuda.is_available():
        return NO_GPU
    wafers = WaferSet.from_table(synthetic_64(n_wafers, seed=8))
    val = wafers.subset(range(min(64, len(wafers))))
    rows = []
    for preset, geometry, batch in GPU_RUNS:
        cfg = bench_config(batch, threads=None, epochs=2, device="cuda")
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"preset": preset, "geometry": geometry})})
        for stage in stages:
            torch.cuda.reset_peak_memory_stats()
            with tempfile.TemporaryDirectory() as tmp:
                result = train_stage(cfg, stage=stage, train_set=wafers, val_set=val, out_dir=tmp, resume=False,
                                     progress=False)
            first, last = result.history[0], result.history[-1]
            rows.append({"preset": preset, "geometry": geometry, "stage": stage, "batch": batch,
                         "wafers": len(wafers), "wafers_per_s": round(last["wafers_per_s"], 1),
                         "first_epoch_wafers_per_s": round(first["wafers_per_s"], 1),
                         "cuda_max_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)})
            print(f"  cuda {preset} {geometry} {stage} batch {batch}: {last['wafers_per_s']:,.0f} wafers/s "
                  f"(first epoch {first['wafers_per_s']:,.0f})", flush=True)
    return {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "train_stage": rows}


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--wafers", type=int, default=512, help="synthetic 64 x 64 training wafers")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lever-threads", default="1,2")
    parser.add_argument("--lever-batches", type=int, default=6, help="batches per timed pass in the step levers")
    parser.add_argument("--big-steps", type=int, default=2, help="steps timed for vgg16 classic and the peer")
    parser.add_argument("--vgg-batch", type=int, default=4)
    parser.add_argument("--sections", default="train_stage,levers,big,gpu")
    parser.add_argument("--gpu-wafers", type=int, default=4096, help="64 x 64 wafers per epoch on the GPU")
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)
    threads_list = [int(t) for t in args.lever_threads.split(",")]
    sections = set(args.sections.split(","))
    wafers = WaferSet.from_table(synthetic_64(args.wafers, seed=7))
    payload: dict = {"machine": machine_info(), "threads": threads, "wafers": args.wafers, "batch": args.batch}
    if "train_stage" in sections:
        payload["train_stage"] = stage_speeds(wafers, batch=args.batch, threads_list=threads_list)
        set_threads(threads)
        print_table("train_stage at 64 x 64 (compact, aligned), wafers/s", payload["train_stage"],
                    ["stage", "threads", "batch", "wafers_per_s", "load_avg"])
    if "levers" in sections:
        payload["step_levers"] = step_levers(wafers, batch=args.batch, threads_list=threads_list,
                                             repeats=args.repeats, n_batches=args.lever_batches)
        set_threads(threads)
        print_table("training step levers at 64 x 64 (compact, aligned)", payload["step_levers"],
                    ["stage", "lever", "threads", "per_s", "per_cpu_s", "load_avg"])
    if "big" in sections:
        payload["models"] = big_models(wafers, batch=args.batch, vgg_batch=args.vgg_batch, steps=args.big_steps,
                                       repeats=args.repeats)
        print_table("training at 64 x 64: ours vs the peer vs the seed's network (channels_last)",
                    payload["models"], ["model", "dtype", "batch", "per_s", "train_gflops_per_s",
                                        "speed_ratio_vs_peer"])
    if "gpu" in sections:
        payload["gpu"] = gpu_rows(n_wafers=args.gpu_wafers)
        if isinstance(payload["gpu"], dict):
            print_table(f"train_stage on {payload['gpu']['gpu']} at 64 x 64, wafers/s (2nd epoch)",
                        payload["gpu"]["train_stage"], ["preset", "geometry", "stage", "batch", "wafers_per_s",
                                                        "first_epoch_wafers_per_s", "cuda_max_allocated_mib"])
        else:
            print(f"\nGPU: {payload['gpu']}")
    return finish("training", payload, results_dir=args.results_dir)


if __name__ == "__main__":
    main()
