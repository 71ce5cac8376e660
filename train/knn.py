"""The online k-NN monitor of pre-training: how well the frozen encoder's features separate labelled classes.

    monitor = KnnMonitor("digits", k=20, max_train=None, img_size=48, batch_size=64, device=device, rank=rank,
                         world_size=world_size, seed=0)           # once per run: the scans and the loaders
    result = monitor.evaluate(model, autocast_dtype)                      # collective; a KnnResult on rank 0

The folder holds ``train/<class>/*`` and ``val/<class>/*`` (or is "digits": the embedded handwritten digits).
Every image goes through the evaluation transform (resize the shorter side to img_size * 256/224, centre crop
img_size) and the whole, unmasked image through the encoder (``MaskedEncoder.encode`` with every patch
visible); the last block's output, through the model's final encoder norm where it has one (MAE; CrossMAE
without inter-block attention), gives two features per image: the cls token and the average of the patch
tokens. Each is scored on its own.

The vote (the weighted k-NN of DINO's evaluation, Caron et al. 2021): features are L2-normalised, so the
similarity of a val image v and a train image t is their cosine s(v, t) = <v, t>. The k train images most
similar to v vote for their labels with weight exp(s / T), T = 0.07:

    score_c(v) = sum over t in the k nearest of v with label(t) = c of exp(s(v, t) / T)

Top-n accuracy counts v when fewer than n other classes score at least as much as its label (a tie is a
miss; a label no neighbour votes for is a miss whenever more than n classes exist; with n classes or fewer
every label is in the top n, as DINO's top-min(5, classes)). Memory: val images are scored in chunks of rows
against the whole bank, at most ``CHUNK_SIMILARITIES`` similarities at a time.

It does not disturb training: every RNG state (torch, CUDA, numpy, Python) is saved before and restored
after, the training loader is not touched, and the model goes back to the mode it was in. Under torchrun
each rank extracts its shard of each folder (the evaluation sharding pads the last shard with files from the
start); one gather brings the shards to rank 0, which keeps each file once (by its index) in file order and
votes: the same bank and the same vote as one process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from train.checkpoint import rng_state, set_rng_state
from train.data import ImageIndex, available_cores, build_loader, resolve_data_path, scan_image_folder

TEMPERATURE = 0.07
TOP_N = (1, 5)
CHUNK_SIMILARITIES = 2**25  # similarities computed at once (128 MiB in fp32): the rows of a val chunk x the bank
SUBSET_STREAM = 0x6B6E6E  # "knn": keeps the --knn_max_train draw apart from the run's other uses of the seed


# -- the vote ----------------------------------------------------------------------------------------------


def knn_class_scores(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, *, k: int,
                     num_classes: int, temperature: float = TEMPERATURE,
                     chunk_similarities: int = CHUNK_SIMILARITIES) -> torch.Tensor:
    """The weighted k-NN class scores (module docstring) of every query: (n_queries, num_classes) float32.

    bank (N, C) and queries (Q, C): features, L2-normalised here (cosine similarity); bank_labels (N,) int64
    in [0, num_classes). k is capped at N. Queries are scored ``max(1, chunk_similarities // N)`` rows at a
    time; the chunking changes the result only by float rounding (a matrix product of other shape)."""
    if bank.ndim != 2 or queries.ndim != 2 or bank.shape[1] != queries.shape[1]:
        raise ValueError(f"bank (N, C) and queries (Q, C) must share C, got {tuple(bank.shape)} and "
                         f"{tuple(queries.shape)}")
    if bank.shape[0] == 0 or bank_labels.shape != (bank.shape[0],):
        raise ValueError(f"bank_labels must be (N,) = ({bank.shape[0]},) with N >= 1, got {tuple(bank_labels.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    bank_labels = bank_labels.to(bank.device)
    k = min(k, bank.shape[0])
    rows = max(1, chunk_similarities // bank.shape[0])
    scores = []
    for start in range(0, queries.shape[0], rows):
        similarity = queries[start:start + rows] @ bank.T  # (rows, N): the chunk's only large tensor
        nearest, where = similarity.topk(k, dim=1)
        weights = (nearest / temperature).exp()
        chunk = torch.zeros(weights.shape[0], num_classes, device=bank.device)
        scores.append(chunk.scatter_add_(1, bank_labels[where], weights))
    return torch.cat(scores) if scores else torch.zeros(0, num_classes, device=bank.device)


def top_n_hits(scores: torch.Tensor, labels: torch.Tensor, ns: tuple[int, ...] = TOP_N) -> list[int]:
    """For each n: how many rows have their label among the n best classes (a tie is a miss: the label must
    score more than all but at most n - 1 other classes)."""
    own = scores.gather(1, labels.to(scores.device).view(-1, 1))
    rivals = (scores >= own).sum(dim=1) - 1  # other classes scoring at least the label's score
    return [int((rivals < n).sum()) for n in ns]


# -- features ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelledFeatures:
    """Features of a folder's images, one row per image: ``ids`` (n,) int64 the file's index in the folder's
    scan, ``labels`` (n,) int64, ``cls`` and ``avg`` (n, C) float32, L2-normalised, on the CPU."""

    ids: torch.Tensor
    labels: torch.Tensor
    cls: torch.Tensor
    avg: torch.Tensor

    @staticmethod
    def merge(shards: list[LabelledFeatures]) -> LabelledFeatures:
        """The shards of every rank as one set: each file once (the copies the evaluation sharding pads with
        are dropped), in file order, whatever the number of ranks."""
        ids = torch.cat([s.ids for s in shards])
        _, first = np.unique(ids.numpy(), return_index=True)  # sorted ids, each one's first row
        keep = torch.from_numpy(first)
        return LabelledFeatures(*(torch.cat([getattr(s, name) for s in shards])[keep]
                                  for name in ("ids", "labels", "cls", "avg")))


def full_image_features(model: nn.Module, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cls token, average of the patch tokens), each (B, C), of the pre-training model's encoder run on the whole
    image (every patch visible): the last block's output, through the model's final encoder norm where it has
    one (MAE's ``norm``; CrossMAE's without inter-block attention), else as the last block leaves it."""
    cfg = model.cfg
    ids = torch.arange(cfg.num_patches, device=imgs.device).expand(imgs.shape[0], -1).contiguous()
    final_norm = model.norm if isinstance(getattr(model, "norm", None), nn.LayerNorm) else None

    def encode(x: torch.Tensor) -> torch.Tensor:
        return model.encode(x, ids, (cfg.depth - 1,), final_norm=final_norm)[1]

    tokens = model.ops.with_compute_weights(model, encode, imgs)
    return tokens[:, 0], tokens[:, 1:].mean(dim=1)


@torch.no_grad()
def extract_features(model: nn.Module, loader, autocast_dtype: torch.dtype | None) -> LabelledFeatures:
    """This rank's shard of ``loader``'s folder (an evaluation loader with labels): one pass, epoch 0."""
    device = next(model.parameters()).device
    loader.set_epoch(0)
    ids, labels, cls, avg = [], [], [], []
    for (imgs, batch_labels), batch_ids in zip(loader, loader.batch_indices(0), strict=True):
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            batch_cls, batch_avg = full_image_features(model, imgs)
        ids.append(torch.as_tensor(batch_ids, dtype=torch.int64))
        labels.append(batch_labels.cpu())
        cls.append(F.normalize(batch_cls.float(), dim=1).cpu())
        avg.append(F.normalize(batch_avg.float(), dim=1).cpu())
    return LabelledFeatures(torch.cat(ids), torch.cat(labels), torch.cat(cls), torch.cat(avg))


def gather_to_main(obj) -> list | None:
    """Every rank's ``obj``, in rank order, on rank 0 (None elsewhere); ``[obj]`` without a process group."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


# -- the monitor -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KnnResult:
    """One evaluation: top-1 / top-5 accuracies in percent of both features, its wall time, its sizes."""

    cls_top1: float
    cls_top5: float
    avg_top1: float
    avg_top5: float
    seconds: float
    num_train: int
    num_val: int
    k: int

    def record(self) -> dict[str, float]:
        """The metrics.jsonl / TensorBoard entries."""
        return {"knn_cls_top1": round(self.cls_top1, 4), "knn_cls_top5": round(self.cls_top5, 4),
                "knn_avg_top1": round(self.avg_top1, 4), "knn_avg_top5": round(self.avg_top5, 4),
                "knn_seconds": round(self.seconds, 3)}

    def describe(self) -> str:
        return (f"k-NN top-1/top-5: cls {self.cls_top1:.1f}/{self.cls_top5:.1f}%, avg {self.avg_top1:.1f}/"
                f"{self.avg_top5:.1f}% ({self.seconds:.1f} s)")


def subset_index(index: ImageIndex, max_images: int | None, seed: int) -> ImageIndex:
    """``index`` itself, or at most ``max_images`` of its files: the first ``max_images`` of a permutation drawn
    from ``seed`` (numpy's default_rng([seed, SUBSET_STREAM])), kept in file order. The same on every rank."""
    if max_images is None or max_images >= len(index):
        return index
    chosen = np.sort(np.random.default_rng([seed & 0xFFFFFFFF, SUBSET_STREAM]).permutation(len(index))[:max_images])
    return replace(index, files=[index.files[i] for i in chosen], labels=index.labels[chosen],
                   sizes=index.sizes[chosen])


class KnnMonitor:
    """The k-NN monitor of one run (module docstring): the two evaluation loaders are built once, here;
    ``evaluate`` runs one evaluation. Raises ValueError naming --knn_data_path when a folder holds no image or
    train/ and val/ hold other classes.

    The loaders decode in this process (torch backend, no worker processes): the DataLoader keeps a loader's
    workers alive between passes, so they would idle through training, and a stop signal sent to the process
    group (SIGTERM) would end them there, which the DataLoader reports as an error wherever the training process
    happens to be. In-process decoding costs little beside the encoder on small folders (the digits: about a
    tenth of an evaluation); on a large one it is the bottleneck: --knn_max_train bounds it."""

    def __init__(self, root: str | Path, *, k: int, max_train: int | None, img_size: int, batch_size: int,
                 device: torch.device, rank: int, world_size: int, seed: int, scan_threads: int | None = None):
        self.root, self.device = Path(resolve_data_path(root)), torch.device(device)
        loaders = {}
        for split in ("train", "val"):
            folder = self.root / split
            index = scan_image_folder(folder, num_threads=scan_threads or available_cores(), classes=True)
            if not len(index):
                raise ValueError(f"--knn_data_path {root}: {folder} holds no image (expected {split}/<class>/<image>)")
            if split == "train":
                index = subset_index(index, max_train, seed)
            loaders[split] = build_loader(folder, batch_size=batch_size, img_size=img_size, train=False,
                                          backend="torch", device=self.device, rank=rank, world_size=world_size,
                                          seed=seed, num_workers=0, with_labels=True, index=index)
        self.train_loader, self.val_loader = loaders["train"], loaders["val"]
        if self.train_loader.classes != self.val_loader.classes:
            raise ValueError(f"--knn_data_path {root}: train/ and val/ hold different classes "
                             f"({self.train_loader.classes[:5]}... vs {self.val_loader.classes[:5]}...)")
        self.classes = self.train_loader.classes
        self.requested_k = k
        self.k = min(k, self.train_loader.num_images)  # the votes of a bank smaller than k: all of it

    def describe(self) -> str:
        bank = self.train_loader.num_images
        k = f"k={self.k}" + (f" (--knn_k {self.requested_k}: the bank holds {bank} images)"
                             if self.k < self.requested_k else "")
        return (f"{self.root}: {bank} train / {self.val_loader.num_images} val images, "
                f"{len(self.classes)} classes, {k}, T={TEMPERATURE}")

    def features(self, model: nn.Module, autocast_dtype: torch.dtype | None
                 ) -> tuple[LabelledFeatures, LabelledFeatures] | None:
        """(train bank, val queries) of every rank's shard, merged, on rank 0 (None on the others). Collective.
        Every RNG state is restored afterwards and the model is put back in the mode it was in."""
        saved_rng, was_training = rng_state(), model.training
        model.eval()
        try:
            shards = (extract_features(model, self.train_loader, autocast_dtype),
                      extract_features(model, self.val_loader, autocast_dtype))
        finally:
            model.train(was_training)
            set_rng_state(saved_rng)
        gathered = gather_to_main(shards)  # one gather: both folders' shards together
        if gathered is None:
            return None
        return LabelledFeatures.merge([g[0] for g in gathered]), LabelledFeatures.merge([g[1] for g in gathered])

    def evaluate(self, model: nn.Module, autocast_dtype: torch.dtype | None) -> KnnResult | None:
        """One evaluation of ``model``'s encoder (the unwrapped module, not a DDP wrapper): a KnnResult on rank 0,
        None on the others. Collective."""
        start = time.perf_counter()
        merged = self.features(model, autocast_dtype)
        if merged is None:
            return None
        bank, queries = merged
        accuracy = []
        for name in ("cls", "avg"):
            scores = knn_class_scores(getattr(bank, name).to(self.device), bank.labels, getattr(queries, name).to(
                self.device), k=self.k, num_classes=len(self.classes))
            accuracy += [100.0 * hits / len(queries.ids) for hits in top_n_hits(scores, queries.labels)]
        return KnnResult(*accuracy, seconds=time.perf_counter() - start, num_train=len(bank.ids),
                         num_val=len(queries.ids), k=self.k)
