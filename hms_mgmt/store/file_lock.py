"""One engine per SQLite file, whatever vhost each serves: an OS lock (``flock``) on the
file, held from before the engine writes anything until it closes the store.

SQLite's own locks are ``fcntl`` byte ranges, which ``flock`` does not touch, so the lock
costs SQLite nothing; it is freed by the kernel when the process dies, even by ``kill -9``.
Without it a second engine on the same file first waited on SQLite's write lock, behind
the running engine's commits, before the vhost's lock refused it (over a minute under load).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import time

from hms_mgmt.errors import StoreError

RETRY_EVERY = 0.1


async def hold(path: str, wait: float) -> int:
    """An open descriptor of ``path`` (created if missing) holding its exclusive lock; close
    it to let go. Waits up to ``wait`` seconds for a holder that is stopping, then raises
    :class:`StoreError` (kind ``in_use``) naming the file and, where Linux says, the holder."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = _holder(os.fstat(fd).st_ino)
                os.close(fd)
                raise StoreError(
                    f"the store {path} is in use by another engine"
                    f"{f' (pid {holder})' if holder else ''}: one engine per SQLite file",
                    kind="in_use",
                    lasting=True,
                ) from None
            await asyncio.sleep(RETRY_EVERY)
        except BaseException:
            os.close(fd)
            raise


def _holder(inode: int) -> int | None:
    """The pid holding a ``flock`` on the file with this inode, from ``/proc/locks``."""
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/locks") as locks:
        for line in locks:
            fields = line.split()
            if "->" in fields:  # a waiter, not a holder
                continue
            if fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[1] == str(inode):
                return int(fields[4])
    return None
