"""Run by tests/test_knn.py, under torchrun (two CPU processes, gloo) and as one plain process: one k-NN evaluation
of a fixed, seeded tiny encoder on a labelled folder; rank 0 writes its numbers and the merged feature banks.

    python tests/knn_ddp_worker.py FOLDER OUT_FILE
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from model import build_model, get_config
from train import distributed
from train.knn import KnnMonitor

IMG_SIZE, BATCH_SIZE, K = 16, 2, 3  # batches of 2 over odd-sized folders: several batches, a padded last shard


def main(folder: str, out_file: str) -> int:
    info = distributed.init_distributed("cpu")
    torch.manual_seed(0)
    model = build_model(get_config("crossmae_vit_tiny_patch8", img_size=IMG_SIZE, decoder_depth=1, backend="torch"))
    monitor = KnnMonitor(folder, k=K, max_train=None, img_size=IMG_SIZE, batch_size=BATCH_SIZE, device=info.device,
                         rank=info.rank, world_size=info.world_size, seed=0)
    shard_sizes = distributed.all_gather_objects(
        [sum(len(ids) for ids in loader.batch_indices(0)) for loader in (monitor.train_loader, monitor.val_loader)])
    result = monitor.evaluate(model, None)
    merged = monitor.features(model, None)
    if info.is_main:
        bank, queries = merged
        torch.save({"bank": vars(bank), "queries": vars(queries)}, Path(out_file).with_suffix(".pt"))
        numbers = {key: value for key, value in result.record().items() if key != "knn_seconds"}
        Path(out_file).write_text(json.dumps({"world_size": info.world_size, "numbers": numbers,
                                              "num_train": result.num_train, "num_val": result.num_val,
                                              "shard_sizes": shard_sizes}))
    distributed.shutdown(sync=True)
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    distributed.exit_process(main(*sys.argv[1:]))
