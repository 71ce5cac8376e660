"""Pre-train CrossMAE (or the MAE baseline).

    python -m train.pretrain            # embedded default: a tiny CrossMAE on the demo photos, a few CPU minutes

    # ViT-B/16, the paper's recipe, one GPU (effective batch 4096 = 256 x 16 accumulation steps):
    python -m train.pretrain --model crossmae_vit_base_patch16 --data_path /data/imagenet/train \\
        --batch_size 256 --accum_iter 16 --epochs 800 --warmup_epochs 40 --blr 1.5e-4 \\
        --mask_ratio 0.75 --kept_mask_ratio 0.25 --output_dir runs/crossmae_b

    # the same on 8 GPUs (256 x 2 x 8 = 4096):
    torchrun --nproc_per_node=8 -m train.pretrain --model crossmae_vit_base_patch16 \\
        --data_path /data/imagenet/train --batch_size 256 --accum_iter 2 --output_dir runs/crossmae_b

Running the same command again resumes from ``<output_dir>/checkpoint-last.pth`` (from the newest
kept ``checkpoint-<epoch>.pth`` if that file is unreadable); ``--resume PATH`` resumes from another
file. One run at a time may use an output folder (``run.lock``); a resumed run refuses other model,
batch, seed or optimisation settings and warns about other changed flags. The learning rate is
``(kept_mask_ratio / mask_ratio) * blr * eff_batch / 256`` unless ``--lr`` is given; the effective
batch is batch_size x accum_iter x world size.

``--config FILE`` reads a recipe (configs/pretrain/*.yaml: the paper's); flags given override it. The run
writes its resolved configuration to ``<output_dir>/config.yaml`` at start. The run itself is
train/trainer.py; this file is the command: flags, the run folder, exit statuses.
"""

from __future__ import annotations

import logging
import os
import sys

from train import distributed
from train.checkpoint import CheckpointWriteError, load_training_checkpoint
from train.checkpointing import CheckpointManager
from train.config.pretrain import parse_pretrain, write_resolved
from train.monitor import setup_logging
from train.run_control import (
    EXIT_DONE,
    EXIT_FAULT,
    EXIT_INTERRUPTED,
    EXIT_REFUSED,
    NonFiniteLoss,
    RunStopped,
    honour_ctrl_c,
)

logger = logging.getLogger("train")


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status: 0 done, 1 stopped by a fault (non-finite loss, a failed
    write), 2 refused (flags, folder, checkpoint), 130 interrupted."""
    honour_ctrl_c()
    trainer = None
    try:
        resolved = parse_pretrain(argv)  # bad flags: a one-line error and exit status 2, before any work
        is_main = int(os.environ.get("RANK", 0)) == 0
        setup_logging(is_main)
        checkpoints = CheckpointManager(resolved.config.run.output_dir, load_training_checkpoint, is_main=is_main)
        clean = False
        try:
            try:
                if is_main:
                    checkpoints.open()
                dist_info = distributed.init_distributed(resolved.config.run.device)
                from train.trainer import PretrainTrainer  # the model and kernels import only for a run

                trainer = PretrainTrainer(resolved, dist_info, checkpoints)
                if is_main:  # once the folder's checkpoint (if any) has been accepted
                    write_resolved(resolved)
            except (FileNotFoundError, ValueError) as e:
                logger.error("%s", e)
                return EXIT_REFUSED
            try:
                trainer.run()
                status = EXIT_DONE
            except RunStopped:
                status = EXIT_INTERRUPTED
            except NonFiniteLoss:
                status = EXIT_FAULT
            clean = True  # every rank ends here together
            return status
        except OSError as e:  # a full disk or a folder gone read-only mid-run; CheckpointWriteError says more
            logger.error("%s", e if isinstance(e, CheckpointWriteError) else
                         f"cannot write {e.filename or 'an output file'} ({e.strerror or e}); {checkpoints.note()}")
            return EXIT_FAULT
        finally:
            if trainer is not None:
                trainer.close()
            distributed.shutdown(sync=clean)
            checkpoints.close()
    except KeyboardInterrupt:
        # Ctrl-C before the loop's handler is installed (start-up), or a second Ctrl-C inside it.
        if trainer is None:
            print("interrupted during start-up; nothing was saved", file=sys.stderr)
        else:
            print(f"interrupted: the step in progress is not saved; {trainer.checkpoints.note()}; run the same "
                  "command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    distributed.exit_process(main())
