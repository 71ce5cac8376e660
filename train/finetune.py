"""Fine-tune a pre-trained encoder (SPEC.md section 2; see train/classify.py for the loop).

    python -m train.finetune                     # demo: the embedded digits, random init, a CPU minute
    python -m train.finetune --finetune output/pretrain/checkpoint-last.pth --model vit_tiny_patch8

    # ViT-B/16 on ImageNet, the authors' recipe (effective batch 1024 = 128 x 8 GPUs):
    torchrun --nproc_per_node=8 -m train.finetune --model vit_base_patch16 --img_size 224 \\
        --finetune runs/crossmae_b/checkpoint-last.pth --data_path /data/imagenet \\
        --batch_size 128 --epochs 100 --warmup_epochs 5 --blr 5e-4 --layer_decay 0.65 --weight_decay 0.05 \\
        --drop_path 0.1 --mixup 0.8 --cutmix 1.0 --smoothing 0.1 --reprob 0.25 --output_dir runs/ft_b
"""

import sys

from train.classify import main

if __name__ == "__main__":
    sys.exit(main("finetune"))
