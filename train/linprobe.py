"""Linear probing of a frozen pre-trained encoder (MAE's recipe; see train/classify.py for the loop).

    python -m train.linprobe              # demo: the embedded digits, random init (python -m train.demo_eval compares)

    # ViT-B/16 on ImageNet (effective batch 16384 = 256 x 8 accumulation x 8 GPUs, LARS, 90 epochs):
    torchrun --nproc_per_node=8 -m train.linprobe --model vit_base_patch16 --img_size 224 \\
        --finetune runs/crossmae_b/checkpoint-last.pth --data_path /data/imagenet \\
        --batch_size 256 --accum_iter 8 --epochs 90 --warmup_epochs 10 --optimizer lars --blr 0.1 \\
        --weight_decay 0 --global_pool token --output_dir runs/lin_b
"""

import sys

from train.classify import main

if __name__ == "__main__":
    sys.exit(main("linprobe"))
