"""One writer per run folder: an exclusive lock held for as long as a training process writes the folder.

``RUN/.lock`` is locked with ``filelock`` (``flock`` on POSIX), which the operating system releases when the
holding process ends, however it ends: a run killed with ``kill -9`` leaves the file behind but not the lock, so
its ``--resume`` is never blocked by a stale lock. Who holds the lock (pid, host, start time, command) is written
to ``RUN/.lock.json`` so that a second writer is refused with an error that names the holder.

While the lock is held nobody else writes the folder, so the orphan temporary files that killed processes left
(``.checkpoint.pt.*.tmp`` from :func:`hbmeta.training.runs.save_checkpoint`) are removed when it is taken.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from filelock import FileLock, Timeout

__all__ = ["RunLock", "RunLockedError", "LOCK_FILE", "HOLDER_FILE"]

LOCK_FILE = ".lock"
HOLDER_FILE = ".lock.json"


class RunLockedError(RuntimeError):
    """Another process is writing the run folder."""


class RunLock:
    """``with RunLock(run_dir):`` hold the folder's write lock (created with the folder if need be).

    Raises:
        RunLockedError: naming the holder (pid, host, start time) when another process holds the lock.
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self._lock: FileLock | None = None

    def holder(self) -> str:
        """Who holds (or last held) the lock, in words."""
        try:
            info = json.loads((self.run_dir / HOLDER_FILE).read_text())
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
            return f"pid {info['pid']} on {info['host']}, started {started}: {info['command']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "a process that has not yet said who it is"

    def __enter__(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.run_dir / LOCK_FILE), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise RunLockedError(f"{self.run_dir} is being written by another hbmeta process ({self.holder()}); wait "
                                 f"for it to finish, or choose another --out") from None
        self._lock = lock
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                  "command": " ".join(sys.argv) or "python"}
        (self.run_dir / HOLDER_FILE).write_text(json.dumps(holder))
        for orphan in self.run_dir.glob(".*.tmp"):  # left by a process killed while writing atomically
            orphan.unlink(missing_ok=True)
        return self

    def __exit__(self, *exc) -> None:
        (self.run_dir / HOLDER_FILE).unlink(missing_ok=True)
        if self._lock is not None:
            self._lock.release()
            self._lock = None
