"""Run by tests/test_pretrain.py under torchrun: the pre-training run (train/trainer.py), built in-process
from the command line's resolved config, on two CPU processes; then a report of what each rank holds
(parameter digest) and which files it read."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from train import distributed
from train.checkpoint import load_training_checkpoint
from train.checkpointing import CheckpointManager
from train.config.pretrain import parse_pretrain
from train.trainer import PretrainTrainer


def main(argv: list[str]) -> int:
    resolved = parse_pretrain(argv)
    output_dir = resolved.config.run.output_dir
    info = distributed.init_distributed("cpu")
    checkpoints = CheckpointManager(output_dir, load_training_checkpoint, is_main=info.is_main)
    if info.is_main:
        checkpoints.open()
    trainer = PretrainTrainer(resolved, info, checkpoints)
    trainer.run()  # a stop or a fault raises: the test then sees a failed worker
    trainer.close()  # the DDP wrapper holds the process group; shutdown() below must be able to end it
    digest = hashlib.sha256()
    for p in trainer.model.parameters():
        digest.update(p.detach().numpy().tobytes())
    loader = trainer.loader
    batches_read = trainer.step * resolved.config.optim.accum_iter
    files = [loader.files[i] for batch in loader.batch_indices(0)[:batches_read] for i in batch]
    reports = distributed.all_gather_objects({"digest": digest.hexdigest(), "files": files})
    if info.is_main:
        Path(output_dir, "ddp_report.json").write_text(json.dumps({
            "world_size": info.world_size,
            "param_digests": [r["digest"] for r in reports],
            "files_read": [r["files"] for r in reports],
        }))
    distributed.shutdown(sync=True)
    checkpoints.close()
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    distributed.exit_process(main(sys.argv[1:]))
