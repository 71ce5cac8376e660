"""Training: pre-training (``python -m train.pretrain``), fine-tuning, probing, export, data, checkpoints.

A Ctrl-C while ``python -m train.<command>`` is still importing (torch alone takes seconds) ends the process
at once with one line: run as a command, this package is imported first, and installs the handler below
before any heavy import. Raising KeyboardInterrupt there instead would print an import traceback, or be
swallowed by a library's ``except`` around an optional import and leave it half-initialised. Nothing is
written during imports, so leaving without clean-up loses nothing. ``train.run_control.execute`` replaces the
handler once the command's own code runs.
"""

from __future__ import annotations

import os
import signal
import sys

EXIT_INTERRUPTED = 130


def exit_at_ctrl_c(signum, frame) -> None:
    """SIGINT handler of a command's imports: one line, exit 130, no unwinding."""
    os.write(2, b"interrupted during start-up; nothing was saved\n")
    os._exit(EXIT_INTERRUPTED)


if sys.argv[:1] == ["-m"]:  # python -m train.<command>: sys.argv[0] is "-m" until the module is found
    signal.signal(signal.SIGINT, exit_at_ctrl_c)
