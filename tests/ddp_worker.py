"""Run by tests/test_pretrain.py under torchrun: train.pretrain's Trainer on two CPU processes, then a
report of what each rank holds (parameter digest) and which files it read."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from train import distributed, pretrain


def main(argv: list[str]) -> int:
    parser = pretrain.build_parser()
    args = parser.parse_args(argv)
    cfg = pretrain.check_args(parser, args)
    info = distributed.init_distributed("cpu")
    trainer = pretrain.Trainer(args, cfg, info)
    status = trainer.run()
    trainer.close()  # the DDP wrapper holds the process group; shutdown() below must be able to end it
    digest = hashlib.sha256()
    for p in trainer.model.parameters():
        digest.update(p.detach().numpy().tobytes())
    loader = trainer.loader
    batches_read = trainer.step * args.accum_iter
    files = [loader.files[i] for batch in loader.batch_indices(0)[:batches_read] for i in batch]
    reports = distributed.all_gather_objects({"digest": digest.hexdigest(), "files": files})
    if info.is_main:
        Path(args.output_dir, "ddp_report.json").write_text(json.dumps({
            "world_size": info.world_size,
            "param_digests": [r["digest"] for r in reports],
            "files_read": [r["files"] for r in reports],
        }))
    distributed.shutdown(sync=True)
    return status


if __name__ == "__main__":
    torch.set_num_threads(1)
    distributed.exit_process(main(sys.argv[1:]))
