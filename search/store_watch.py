"""Stop a campaign whose file store disappears or is replaced under it.

Deleting ``optuna.db`` mid-campaign used to go unnoticed: the driver kept writing to the deleted
file (its open connection), the next command created a fresh empty study and reported
``complete 0``. The driver records each file store's identity (device, inode) when the campaign
starts and a watcher thread compares it every few seconds; a change stops the campaign through
the same graceful path as Ctrl+C, with a message naming the store. Server stores (Postgres,
an MLflow server) are the server's business and are not watched.
"""

from __future__ import annotations

import os
import threading

from search import signals, uris


def identity(uri: str) -> list[int] | None:
    """``[device, inode]`` of a file store's file; None for server stores or a missing file."""
    path = uris.store_file(uri)
    if path is None:
        return None
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return [st.st_dev, st.st_ino]


def changed(uri: str, recorded: list[int] | None) -> str | None:
    """Why a file store no longer is the one recorded (None: unchanged, or not a file store)."""
    if recorded is None or uris.store_file(uri) is None:
        return None
    now = identity(uri)
    if now is None:
        return f"{uris.redact(uri)} was deleted"
    if list(now) != list(recorded):
        return f"{uris.redact(uri)} was replaced by a different file"
    return None


class StoreWatcher:
    """Polls the recorded stores; on a change asks the campaign to stop (``signals.request_stop``)."""

    def __init__(self, stores: dict[str, list[int] | None], interval_s: float = 2.0):
        self.stores = {uri: ident for uri, ident in stores.items() if ident is not None}
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="oscqat-store-watch", daemon=True)

    def check(self) -> str | None:
        for uri, ident in self.stores.items():
            why = changed(uri, ident)
            if why:
                return why
        return None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            why = self.check()
            if why:
                signals.request_stop(why)
                return

    def __enter__(self) -> "StoreWatcher":
        if self.stores:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()


def check_stores(stores: dict[str, list[int] | None]) -> None:
    """Raise ``StoreChanged`` when a recorded file store is gone or replaced (resume, target start)."""
    for uri, ident in stores.items():
        why = changed(uri, ident)
        if why:
            raise StoreChanged(why)


class StoreChanged(RuntimeError):
    """A campaign's store is not the one it started with; continuing would write a fresh history."""

    def __init__(self, why: str):
        super().__init__(f"{why}; the campaign stopped so as not to write a new, empty history. Put the "
                         f"original store back (from a backup) and run `oscqat search resume`")
