"""Helpers for tests that drive a real child process: read its output up to a line, Ctrl-C it and collect how it
ended."""

from __future__ import annotations

import signal
import subprocess
import time


def wait_for_line(proc: subprocess.Popen, marker: str, timeout: float = 120) -> str:
    """Read the child's merged output until a line holds ``marker``; returns what was read. Kills the child and
    fails the test, with everything it printed, if no such line comes within ``timeout`` seconds."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if marker in line:
            return "".join(seen)
    proc.kill()
    raise AssertionError(f"no line with {marker!r} from the child:\n{''.join(seen)}{proc.stdout.read()}")


def output_after_ctrl_c(proc: subprocess.Popen, what: str, timeout: float = 20) -> str:
    """Send SIGINT; the child's remaining output once it has exited. Fails the test (killing the child) if it is
    still running ``timeout`` seconds later (a generous bound for a loaded machine), naming ``what`` it was doing."""
    proc.send_signal(signal.SIGINT)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        raise AssertionError(f"still running {timeout:g} s after a Ctrl-C during {what}:\n{output}") from None
    return output
