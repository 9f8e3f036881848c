"""Train FCN stages from Parquet wafer tables, in one process or under ``torchrun``.

    torchrun --nproc_per_node=8 -m fcn_core.launch --train train.parquet --val val.parquet \
        --out runs/ckpt --config default [--stage fcn8s --init runs/ckpt/fcn16s/best.pt]

Every rank reads the (small) tables, then DistributedDataParallel shares the steps; rank 0 writes
checkpoints and prints one JSON line per finished stage. Without ``--stage`` the stages up to
``train.final_stage`` run in sequence, each from the previous stage's best checkpoint.
"""

from __future__ import annotations

import argparse
import json

from fcn_core.config import load_config
from fcn_core.data import WaferSet
from fcn_core.table import read_parquet
from fcn_core.stages import STAGES
from fcn_core.train import init_distributed, stage_device, stages_to_train, train_stage


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fcn_core.launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", required=True, help="wafer table with label maps (Parquet file/folder/URI)")
    parser.add_argument("--val", required=True, help="validation wafer table")
    parser.add_argument("--out", required=True, help="checkpoint folder")
    parser.add_argument("--config", default="default", help="config name or path")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="key.path=value override")
    parser.add_argument("--stage", choices=STAGES, help="train only this stage")
    parser.add_argument("--init", help="checkpoint of the previous stage (with --stage fcn16s or finer)")
    parser.add_argument("--no-resume", action="store_true", help="ignore an existing last.pt")
    args = parser.parse_args(argv)

    cfg = load_config(args.config, args.overrides)
    info = init_distributed(stage_device(cfg))
    train_set = WaferSet.from_table(read_parquet(args.train))
    val_set = WaferSet.from_table(read_parquet(args.val))
    stages = [args.stage] if args.stage else list(stages_to_train(cfg))
    init = args.init
    for stage in stages:
        result = train_stage(cfg, stage=stage, train_set=train_set, val_set=val_set, out_dir=args.out,
                             init_checkpoint=init, resume=not args.no_resume, progress=info.is_main)
        init = result.best_checkpoint
        if info.is_main:
            print(json.dumps({"result": result.to_dict()}), flush=True)


if __name__ == "__main__":
    main()
