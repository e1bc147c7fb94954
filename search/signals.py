"""Ctrl+C and SIGTERM stop the whole campaign cleanly, leaving it resumable.

Tune handles SIGINT itself: it ends ``fit()`` after saving the experiment state and returns
normally, so the caller cannot tell an interrupted target from a finished one (which marked it
done, failed its live trials in Optuna and started the next target). Here the driver owns SIGINT
and SIGTERM: the first one records the stop and asks Tune to stop through its SIGUSR1 handler
(same graceful path: final snapshot, trials paused), or raises ``KeyboardInterrupt`` outside a
Tune loop; a second one raises at once. ``raise_if_interrupted()`` after ``fit()`` turns the
recorded stop into ``CampaignInterrupted``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading


class CampaignInterrupted(RuntimeError):
    """The user (SIGINT) or the system (SIGTERM) stopped the campaign; it can be resumed."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


_received: list[int] = []
_reasons: list[str] = []  # stops asked for by the driver itself (a store changed), not by a signal


def interrupted() -> int | None:
    """The first stop signal received while ``stop_on_signals`` was active (None: none)."""
    return _received[0] if _received else None


def raise_if_interrupted() -> None:
    if _reasons:
        from search.store_watch import StoreChanged

        raise StoreChanged(_reasons[0])
    if _received:
        raise CampaignInterrupted(_received[0])


def request_stop(why: str) -> None:
    """Stop the running Tune loop gracefully from any thread (the store watcher found a change)."""
    _reasons.append(why)
    sys.stderr.write(f"\nstopping the campaign: a store changed under it: {why}\n")
    handler = _tune_handler()
    if handler is not None:
        handler(signal.SIGUSR1, None)  # only sets Tune's stop event: safe off the main thread


def _tune_handler():
    """Tune's SIGUSR1 handler while a Tune loop runs (it sets the loop's stop event), else None."""
    handler = signal.getsignal(signal.SIGUSR1) if hasattr(signal, "SIGUSR1") else None
    qualname = getattr(handler, "__qualname__", "")
    return handler if callable(handler) and "_setup_signal_catching" in qualname else None


def _handle(signum, frame):
    first = not _received
    _received.append(signum)
    if not first:
        raise KeyboardInterrupt  # a second signal: stop now (the last snapshot still resumes)
    name = signal.Signals(signum).name
    sys.stderr.write(f"\n{name} received: stopping the campaign after Tune saves its state "
                     f"(send it again to stop at once); continue with `oscqat search resume`\n")
    handler = _tune_handler()
    if handler is None:
        raise KeyboardInterrupt
    handler(signum, frame)


@contextlib.contextmanager
def stop_on_signals():
    """Route SIGINT/SIGTERM to the graceful stop for the duration of a campaign (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received.clear()
    _reasons.clear()
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # Tune must not take SIGINT over from us
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    usr1 = signal.getsignal(signal.SIGUSR1) if hasattr(signal, "SIGUSR1") else None
    for s in previous:
        signal.signal(s, _handle)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if usr1 is not None:
            signal.signal(signal.SIGUSR1, usr1)  # Tune leaves its handler bound to a finished loop


def reset_tune_handler() -> None:
    """After a ``fit()``: Tune leaves SIGUSR1 bound to the finished loop; put the default back."""
    if _tune_handler() is not None:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
