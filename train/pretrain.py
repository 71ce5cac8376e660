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

from train import distributed
from train.checkpoint import load_training_checkpoint
from train.config.pretrain import parse_pretrain, write_resolved
from train.run_control import execute
from train.trainer import PretrainTrainer


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status: 0 done, 1 stopped by a fault (non-finite loss, a failed
    write), 2 refused (flags, folder, checkpoint), 130 interrupted."""
    return execute(lambda: parse_pretrain(argv), PretrainTrainer, load_training_checkpoint, write_resolved)


if __name__ == "__main__":
    distributed.exit_process(main())
