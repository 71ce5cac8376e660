"""Linear probing of a frozen pre-trained encoder (MAE's recipe; see train/classify.py for the loop).

    python -m train.linprobe              # demo: the embedded digits, random init (python -m train.demo_eval compares)

    # ViT-B/16 on ImageNet, MAE's recipe (effective batch 16384 = 256 x 8 accumulation x 8 GPUs, LARS, 90 epochs;
    # configs/linprobe/*.yaml hold S/B/L/H):
    torchrun --nproc_per_node=8 -m train.linprobe --config configs/linprobe/vit_base_patch16.yaml \\
        --finetune runs/crossmae_b/checkpoint-last.pth --data_path /data/imagenet
"""

import sys

from train.classify import main

if __name__ == "__main__":
    sys.exit(main("linprobe"))
