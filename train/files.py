"""Writing into a run folder that others may be able to write to (a shared or /tmp-based one).

No file a run writes follows a symbolic link it did not create: whole files are written to a fresh temporary
file (``mkstemp``: a random name, created exclusively) and renamed over their name (a rename replaces a
planted link itself, never its target); files a run appends to are opened with ``O_NOFOLLOW``, and a link in
their place is refused with one line. A reader never sees half a file.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


class PlantedLinkError(OSError):
    """A file the run writes is a symbolic link."""


def file_mode() -> int:
    """The mode a plain ``open()`` would give a new file: 0o666 less the umask (mkstemp's is 0o600)."""
    try:  # Linux states it; elsewhere reading the umask means setting it (briefly, process-wide)
        with open("/proc/self/status") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask



def replace_atomically(path: str | os.PathLike, write: Callable[[IO[bytes]], None], *, durable: bool = False) -> None:
    """Write ``path`` through ``write(file)`` on a fresh temporary file in the same folder, then rename it over
    ``path``; ``durable``: flush it to disk first. The temporary file is removed if anything fails."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def open_nofollow(path: str | os.PathLike, flags: int) -> int:
    """``os.open(path, flags | O_NOFOLLOW | O_CLOEXEC)``; a symbolic link there raises PlantedLinkError naming it."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, file_mode())
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise PlantedLinkError(errno.ELOOP, f"{path} is a symbolic link, which this run did not make (the folder "
                                                "may be writable by others): remove it, or use another --output_dir",
                                   str(path)) from None
        raise


def open_for_append(path: str | os.PathLike, binary: bool = False) -> IO:
    """``path`` opened for appending (created if missing), never through a symbolic link."""
    fd = open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    return os.fdopen(fd, "ab" if binary else "a", encoding=None if binary else "utf-8")
