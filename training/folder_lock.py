"""One run per folder at a time: a run holds an exclusive lock (flock) on `.lock` in its run folder, and a sweep
on `.lock` in its sweep folder, for as long as it lives.

Checking for a run's files is not enough: they appear only after its first epoch, so a second run started a
second later in the same folder would go through and interleave its logs, events and checkpoints with the
first's. The kernel drops a flock when its process ends however it ends (SIGKILL, a lost node), so a lock is
never stale: the successor of a crashed or preempted run takes it without any cleanup. `.lock` itself stays
(removing it would let two runs lock two different files of one name); it holds the holder's process id, for
the message. On a shared file system the lock needs flock support (NFSv4 has it; Lustre when mounted with
`flock`); where the file system refuses locks, the run warns once and goes on unlocked.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from contextlib import contextmanager
from pathlib import Path

from errors import UserError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
_held: dict[Path, int] = {}  # this process's claims: folder -> the open lock file (closing it unlocks)


def claim(folder: Path, key: str) -> bool:
    """Lock `folder` (which must exist) for this process: True when this call took the lock, False when this
    process already held it. UserError naming `key` (the setting that chose the folder) when another process
    holds it; nothing in the folder is changed then."""
    folder = folder.resolve()
    if folder in _held:
        return False
    path = folder / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise UserError(f"cannot create {path} ({e.strerror or e}): point {key} at a writable folder") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip()
        os.close(fd)
        by = f" (process {holder})" if holder.isdigit() else ""
        raise UserError(f"{folder} is in use by another run{by}: one folder holds one run at a time; wait for it "
                        f"to end, or pick another {key}") from None
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        os.close(fd)
        log.warning("%s: this file system refuses locks (%s): nothing stops a second run from using %s at the same "
                    "time", path, e.strerror, folder)
        return False
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[folder] = fd
    return True


def release(folder: Path) -> None:
    fd = _held.pop(folder.resolve(), None)
    if fd is not None:
        os.close(fd)


@contextmanager
def claimed(folder: Path, key: str):
    """`folder` locked for the block; a lock this process already held (taken by train.py's Hydra callback,
    released when the process ends) is left as it was."""
    took = claim(folder, key)
    try:
        yield
    finally:
        if took:
            release(folder)
