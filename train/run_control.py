"""How a training loop stops: on request (Ctrl-C, SIGTERM), or on a non-finite loss; and the exit statuses.

The loops raise ``RunStopped`` (saved on request: exit 130) or ``NonFiniteLoss`` (not saved: exit 1);
``main()`` of each command maps them to the process's exit status, so no loop returns a status code.
"""

from __future__ import annotations

import logging
import signal

import torch

from train import distributed

logger = logging.getLogger("train")

EXIT_DONE, EXIT_FAULT, EXIT_REFUSED, EXIT_INTERRUPTED = 0, 1, 2, 130


class RunStopped(Exception):
    """The run stopped on request after saving (or with nothing new to save)."""


class NonFiniteLoss(Exception):
    """A non-finite loss was seen; the last good checkpoint is left as it was."""


def honour_ctrl_c() -> None:
    """One rule for Ctrl-C, whatever the launching shell did: it stops the process. A background job of a
    non-interactive shell starts with SIGINT ignored, which Python keeps; restore Python's handler (which
    raises KeyboardInterrupt) so that a Ctrl-C during start-up ends it as it does in a terminal."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
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
