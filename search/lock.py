"""One driver per campaign directory.

Two drivers on one campaign share one study and one Tune folder and corrupt both (starting
points enqueued twice, one's orphan sweep failing the other's live trials). The lock is a file
``driver.lock`` holding the owner's pid, host and command, with an ``flock`` held for the
driver's lifetime: the kernel drops it when the process dies, however it dies, so a lock file
left by a killed driver is recognised as stale (and a reused pid cannot fake a live owner).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_FILE = "driver.lock"


class CampaignLocked(RuntimeError):
    """Another live driver holds the campaign."""


def read_lock(campaign_dir: Path) -> dict | None:
    """The lock file's owner record (whether or not it is still held), None when there is none."""
    path = Path(campaign_dir) / LOCK_FILE
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return {} if path.exists() else None


class CampaignLock:
    """``with CampaignLock(dir):`` holds the campaign for this process; raises CampaignLocked if taken."""

    def __init__(self, campaign_dir: Path, name: str = ""):
        self.path = Path(campaign_dir) / LOCK_FILE
        self.name = name or Path(campaign_dir).name
        self._fd: int | None = None
        self.stale: dict | None = None  # the record of a dead owner this lock replaced

    def acquire(self) -> "CampaignLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self._refuse()
            try:  # the owner removes the file as it releases: a lock on a removed file holds nothing
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        previous = os.read(fd, 65536).decode(errors="replace").strip()
        if previous:  # left by a driver that died holding it (the kernel released its flock)
            try:
                self.stale = json.loads(previous)
            except json.JSONDecodeError:
                self.stale = {"raw": previous[:200]}
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)[:500]}
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(record).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def _refuse(self) -> None:
        owner = read_lock(self.path.parent) or {}
        raise CampaignLocked(
            f"campaign {self.name!r} is already being run by another driver (pid {owner.get('pid', '?')} on "
            f"{owner.get('host', '?')}, since {owner.get('started', '?')}: {owner.get('command', '?')}); "
            f"wait for it to finish or stop it (Ctrl+C), then `oscqat search resume {self.name}`") from None

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still held: a waiting driver re-checks the inode
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "CampaignLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
