"""Analyses of pre-trained CrossMAE / MAE models (ours or the authors' released files): decoder attention, PSNR of
the reconstructions, compute and parameters, reconstruction grids.

    python -m train.analyze attention   CHECKPOINT --data_path FOLDER [--max_images N]
    python -m train.analyze psnr        CHECKPOINT --data_path FOLDER [--max_images N]
    python -m train.analyze cost        [CHECKPOINT] [--model NAME --kept_mask_ratio G --decoder_depth N ...]
    python -m train.analyze reconstruct CHECKPOINT (--data_path FOLDER | --images A.jpg B.png ...)

common: --output_dir DIR (default output/analyze) --seed S --device cpu|cuda --batch_size B --model NAME

Each writes ``<what>.json`` (every number, the model's configuration, the command line and the machine),
``<what>.md`` (tables) and PNG pictures into ``--output_dir``.

- **attention** (attention.py): per decoder block, where the queries' attention goes. MAE: the mask-token queries'
  softmax mass on the visible keys, the mask-token keys and the cls key (summing to 1 per block), per key and
  relative to uniform attention, summed and averaged over blocks. CrossMAE: the mass on the cls key vs the patch
  keys, and the inter-block mixing weights W as a heat map. Always the reference path: probabilities recomputed
  in fp32 from each block's q/k weights and its inputs (forward hooks), with an explicit softmax.
- **psnr** (psnr.py): PSNR of every hidden patch's reconstruction in [0, 1] pixel space, per image, then the mean
  over images (an exact reconstruction, PSNR +inf, is counted apart) and the PSNR of the pooled MSE (Table 13).
- **cost** (cost.py): encoder and decoder GMACs per image and parameters of any configuration, no weights needed;
  without a model, the paper's ViT-B configurations beside the paper's figures.
- **reconstruct** (reconstruct.py): the training run's grid (original | visible | predicted | pasted) for any
  checkpoint and images.

Images are evaluation crops (shorter side to img_size * 256/224, centre crop); image i of the folder's sorted
files (or of ``--images``) is masked with noise from a generator seeded by (seed, i), so that two checkpoints are
compared on the same patches whatever the batch size or device (inputs.py). Which model a file holds: loading.py.
"""
