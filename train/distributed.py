"""Data-parallel setup under torchrun (NCCL on GPU, gloo on CPU); a no-op for one process."""

from __future__ import annotations

import gc
import logging
import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


_started_group = False  # whether this process ever started a process group (see exit_process)


def init_distributed(device: str | None = None) -> DistInfo:
    """Read torchrun's environment, pick the device, start the process group if there are peers."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA GPU is visible; use --device cpu")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device(device)
    if world_size > 1 and not dist.is_initialized():
        global _started_group
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world_size)
        _started_group = True
    return DistInfo(rank, world_size, local_rank, dev)


def is_enabled() -> bool:
    """Whether this process is one of several (a process group is running)."""
    return dist.is_initialized() and dist.get_world_size() > 1


def wrap_ddp(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module | None:
    """The DistributedDataParallel wrapper of ``model`` when there are peers, else None."""
    if not info.enabled:
        return None
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)


def all_gather_objects(obj):
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def mean_across_ranks(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def shutdown(sync: bool = False) -> None:
    """Destroy the process group (a no-op without one).

    sync: wait for every rank first (only where all ranks come here together, i.e. after a clean end),
    so that no rank closes its connections while a peer still sends on them. Drop references to
    DistributedDataParallel wrappers before calling this, then leave through ``exit_process``."""
    if not dist.is_initialized():
        return
    if sync:
        dist.barrier()
    gc.collect()  # unreachable wrappers that hold the group go first
    dist.destroy_process_group()


def exit_process(status: int) -> NoReturn:
    """End the process with ``status``. After a process group, skip the interpreter's teardown
    (``os._exit``, once output is flushed): DistributedDataParallel keeps the gloo group alive past
    ``destroy_process_group`` (torch 2.13: its worker threads pt_gloo_runloop and gloo_tcp_loop still
    run afterwards, even with the wrapper freed), and tearing the interpreter and C++ statics down
    under those threads is what now and then aborted a rank ("terminate called without an active
    exception", SIGABRT). Call it after ``shutdown``; a single process exits normally."""
    if not _started_group:
        sys.exit(status)
    logging.shutdown()  # flushes the handlers
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
