"""The synthetic source: random normalised images made on the device, for measuring the model alone."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from train.data.folder import EpochPasses

IMAGENET_TRAIN_SIZE = 1_281_167  # the default epoch length: ImageNet-1k's training images


class SyntheticLoader(EpochPasses):
    """Random normalised images made on `device`: N(0, 1) pixels, the statistics of normalised data.

    Same interface and resumption contract as FolderLoader; batch b of epoch e is a pure function of
    (seed, rank, epoch, b). labels: random classes in [0, num_classes) with `with_labels`, else the
    sample's position in the epoch.
    """

    backend = "synthetic"

    def __init__(self, batch_size: int, img_size: int, device: torch.device, *, num_images: int = IMAGENET_TRAIN_SIZE,
                 rank: int = 0, world_size: int = 1, seed: int = 0, with_labels: bool = False, num_classes: int = 1000):
        self.batch_size, self.img_size, self.device = batch_size, img_size, torch.device(device)
        self.num_images, self.rank, self.world_size, self.seed = num_images, rank, world_size, seed
        self.with_labels, self.num_classes = with_labels, num_classes
        self.classes = [str(k) for k in range(num_classes)] if with_labels else []
        self.skipped: list[str] = []
        self.files: list[str] = []
        self._length = num_images // (world_size * batch_size)
        if self._length == 0:
            raise ValueError(f"num_images={num_images} is less than batch_size x world_size: raise num_images")

    def __len__(self) -> int:
        return self._length

    def _iterate(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator(device=self.device)
        shape = (self.batch_size, 3, self.img_size, self.img_size)
        for b in range(start, len(self)):
            gen.manual_seed(hash((self.seed, self.rank, epoch, b)) & 0x7FFF_FFFF_FFFF_FFFF)  # host-side only
            images = torch.randn(shape, device=self.device, generator=gen)
            if self.with_labels:
                labels = torch.randint(0, self.num_classes, (self.batch_size,), device=self.device, generator=gen)
            else:
                first = (b * self.world_size + self.rank) * self.batch_size
                labels = torch.arange(first, first + self.batch_size, device=self.device)
            yield images, labels
