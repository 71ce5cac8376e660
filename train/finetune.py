"""Fine-tune a pre-trained encoder (SPEC.md section 2; see train/classify.py for the loop).

    python -m train.finetune                     # demo: the embedded digits, random init (see the README)
    python -m train.finetune --finetune output/pretrain/checkpoint-last.pth   # image and patch size: the checkpoint's

The defaults are a recipe for the demo's 1,438 digits of 32 pixels, 10 epochs of 22 steps: lr 1e-3
(blr 4e-3), no mixup, CutMix, RandAugment or random erasing. The ImageNet recipe below (Table 11) is
tuned for 100 epochs of 1.28M images; on the demo its lr (blr 5e-4 -> 1.25e-4 at batch 64) barely moves
the head in 220 steps and its augmentation erases most of what a 32-pixel digit shows.

    # ViT-B/16 on ImageNet, the authors' recipe (effective batch 1024 = 128 x 8 GPUs; configs/finetune/*.yaml
    # hold S/B/L/H):
    torchrun --nproc_per_node=8 -m train.finetune --config configs/finetune/vit_base_patch16.yaml \\
        --finetune runs/crossmae_b/checkpoint-last.pth --data_path /data/imagenet
"""

import sys

from train.classify import main

if __name__ == "__main__":
    sys.exit(main("finetune"))
