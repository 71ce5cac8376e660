"""How a training run starts and stops: on request (Ctrl-C, SIGTERM), on a non-finite loss, on a fault; and the
exit statuses.

The loops raise ``RunStopped`` (saved on request: exit 130), ``NonFiniteLoss`` (not saved: exit 1) or let a
loader's ``DataSourceLost`` through (the data went away mid-run; saved where one process can: exit 1);
``execute`` (every training command's ``main``) maps them, refusals and write failures to the process's exit
status, so no loop returns a status code.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from train import EXIT_INTERRUPTED, distributed, exit_at_ctrl_c
from train.checkpoint import CheckpointWriteError
from train.checkpointing import CheckpointManager
from train.data import DataSourceLost
from train.monitor import setup_logging

logger = logging.getLogger("train")

EXIT_DONE, EXIT_FAULT, EXIT_REFUSED = 0, 1, 2  # and EXIT_INTERRUPTED (130), from train/__init__.py


class RunStopped(Exception):
    """The run stopped on request after saving (or with nothing new to save)."""


class NonFiniteLoss(Exception):
    """A non-finite loss was seen; the last good checkpoint is left as it was."""


def honour_ctrl_c() -> None:
    """One rule for Ctrl-C, whatever the launching shell did: it stops the process. A background job of a
    non-interactive shell starts with SIGINT ignored, which Python keeps; and ``python -m train.<command>``
    ends its imports with train/__init__.py's handler. Both give way to Python's handler (which raises
    KeyboardInterrupt), so that a Ctrl-C during start-up ends the run as it does in a terminal, with clean-up."""
    if signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, exit_at_ctrl_c):
        signal.signal(signal.SIGINT, signal.default_int_handler)


class StopRequest:
    """While active, SIGINT / SIGTERM ask the loop to save and leave at the next step boundary; a second
    Ctrl-C interrupts at once (KeyboardInterrupt)."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("%s received: saving a checkpoint at the end of this step, then exiting",
                       signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def agreed(self, device: torch.device) -> bool:
        """Whether any process was asked to stop; collective under DDP, so that all save the same step."""
        if not distributed.is_enabled():
            return self.requested
        return distributed.mean_across_ranks(torch.tensor(float(self.requested), device=device)).item() > 0


class NonFiniteGuard:
    """Remembers, on the device (no host sync per step), the first step whose loss was not finite."""

    def __init__(self, device: torch.device):
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)

    def observe(self, loss: torch.Tensor, step: int) -> None:
        self.bad_step = torch.where((self.bad_step < 0) & ~torch.isfinite(loss), step, self.bad_step)

    def check(self, note: str) -> None:
        """Raise NonFiniteLoss (logging the step and ``note``, where to resume from) if any process has seen
        a non-finite loss. Collective under DDP."""
        seen = distributed.mean_across_ranks((self.bad_step >= 0).float()).item() > 0
        if seen:
            where = f"step {int(self.bad_step.item()) + 1}" if self.bad_step.item() >= 0 else "another process's step"
            logger.error("non-finite loss at %s: stopping without saving; %s", where, note)
            raise NonFiniteLoss(where)


def out_of_memory(error: BaseException) -> bool:
    """A GPU's or the host's allocator gave up (the CPU allocator raises a plain RuntimeError)."""
    return isinstance(error, torch.OutOfMemoryError | MemoryError) or "can't allocate memory" in str(error)


class Run(Protocol):
    """A training run as ``execute`` drives it."""

    checkpoints: CheckpointManager

    def run(self) -> None: ...

    def close(self) -> None: ...


def execute(parse: Callable[[], Any], build: Callable[[Any, distributed.DistInfo, CheckpointManager], Run],
            read: Callable[[Path], dict[str, Any]], record: Callable[[Any], Any],
            kept_glob: str | None = "checkpoint-[0-9]*.pth") -> int:
    """Run a training command; returns its exit status: 0 done, 1 stopped by a fault (non-finite loss, a failed
    write), 2 refused (flags, folder, checkpoint), 130 interrupted.

    ``parse()`` resolves the command line (bad flags: one line and exit 2, before any work); the run folder is
    opened (locked) on rank 0, ``build(resolved, dist_info, checkpoints)`` makes the run (it resumes or refuses
    the folder's checkpoint, read by ``read``), then rank 0 records the resolved settings (``record``)."""
    honour_ctrl_c()
    run = None
    try:
        resolved = parse()
        is_main = int(os.environ.get("RANK", 0)) == 0
        setup_logging(is_main)
        checkpoints = CheckpointManager(resolved.config.run.output_dir, read, is_main=is_main, kept_glob=kept_glob)
        clean = False
        try:
            try:
                if is_main:
                    checkpoints.open()
                run = build(resolved, distributed.init_distributed(resolved.config.run.device), checkpoints)
                if is_main:  # once the folder's checkpoint (if any) has been accepted
                    record(resolved)
            except (FileNotFoundError, ValueError, KeyError) as e:  # KeyError's str() would quote the message
                logger.error("%s", e.args[0] if isinstance(e, KeyError) and e.args else e)
                return EXIT_REFUSED
            try:
                run.run()
                status = EXIT_DONE
            except RunStopped:
                status = EXIT_INTERRUPTED
            except NonFiniteLoss:
                status = EXIT_FAULT
            except DataSourceLost as e:  # not clean: under DDP the other processes may be inside a step
                logger.error("%s; %s; restore the data and run the same command to resume", e, checkpoints.note())
                return EXIT_FAULT
            clean = True  # every rank ends here together
            return status
        except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
            if not out_of_memory(e):
                raise
            optim = resolved.config.optim
            logger.error("out of memory (%s) at --batch_size %d per process: lower --batch_size (and raise "
                         "--accum_iter to keep the effective batch); %s", str(e).strip().splitlines()[0][:120],
                         optim.batch_size, checkpoints.note())
            return EXIT_FAULT
        except OSError as e:  # a full disk or a folder gone read-only mid-run; CheckpointWriteError says more
            logger.error("%s", e if isinstance(e, CheckpointWriteError) else
                         f"cannot write {e.filename or 'an output file'} ({e.strerror or e}); {checkpoints.note()}")
            return EXIT_FAULT
        finally:
            if run is not None:
                run.close()
            distributed.shutdown(sync=clean)
            checkpoints.close()
    except KeyboardInterrupt:
        # Ctrl-C before the loop's handler is installed (start-up), or a second Ctrl-C inside it.
        if run is None:
            print("interrupted during start-up; nothing was saved", file=sys.stderr)
        else:
            print(f"interrupted: the step in progress is not saved; {run.checkpoints.note()}; run the same "
                  "command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
