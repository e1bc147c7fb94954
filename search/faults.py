"""Fault injection for the reliability tests, kept out of the trainable.

Inactive unless ``OSCQAT_FAULT_INJECT`` is set in the trial process (tests/reliability set it);
the trainable calls ``maybe_inject`` before and after each epoch.
"""

from __future__ import annotations

import os
import time

ENV_VAR = "OSCQAT_FAULT_INJECT"
SLEEP_ENV_VAR = "OSCQAT_FAULT_SLEEP_S"
BARRIER_ENV_VAR = "OSCQAT_FAULT_BARRIER"  # "DIR:N" for barrier@EPOCH
BARRIER_TIMEOUT_S = 180.0
GATE_ENV_VAR = "OSCQAT_FAULT_GATE"  # a file path for gate@*


def barrier(directory: str, parties: int, timeout_s: float = BARRIER_TIMEOUT_S) -> int:
    """Rendezvous of the first ``parties`` trials through files in ``directory``: each arrival
    writes its own file; one of the first ``parties`` waits until all of them are there, a later
    one passes at once. Returns this arrival's number (1-based). A placement test uses it so two
    trials are certainly running at the same time, whatever the actor start-up times."""
    os.makedirs(directory, exist_ok=True)
    mine = os.path.join(directory, f"{os.getpid()}-{time.monotonic_ns()}")
    with open(mine, "x"):
        pass
    arrived = len(os.listdir(directory))
    if arrived > parties:
        return arrived
    deadline = time.monotonic() + timeout_s
    while len(os.listdir(directory)) < parties:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fault barrier: {len(os.listdir(directory))} of {parties} trials arrived "
                               f"in {timeout_s:.0f} s ({directory})")
        time.sleep(0.05)
    return arrived


def spec() -> str | None:
    """The fault spec of this process (read once per trial), None when no test asked for faults."""
    return os.environ.get(ENV_VAR) or None


def maybe_inject(spec: str | None, epoch: int, restored: bool, cfg=None, trainer=None,
                 before: bool = False) -> None:
    """Fault injection for the reliability tests; active only when OSCQAT_FAULT_INJECT is set,
    and only on a trial's first (non-restored) attempt.

    ``spec`` is a comma-separated list of ``KIND@EPOCH[:FIELD=VALUE]``: ``raise`` (an exception once
    epoch EPOCH has trained, before it is reported), ``kill`` (SIGKILL of the trial process at the
    same point), ``nan`` (NaN written into the model's weights before epoch EPOCH, so that epoch's
    loss is non-finite). ``FIELD=VALUE`` limits a fault to trials whose TrainConfig field has that
    value, e.g. ``raise@2:method=lsq,nan@2:method=freeze``. ``barrier`` (with
    ``OSCQAT_FAULT_BARRIER=DIR:N``) holds the first N trials before epoch EPOCH until all N have
    arrived (``barrier``, above). ``sleep@*`` (with
    ``OSCQAT_FAULT_SLEEP_S``) paces every epoch, restored attempts included, so a test can stop a
    campaign while work certainly remains. ``gate@*`` (with ``OSCQAT_FAULT_GATE=PATH``) holds every
    trial before each epoch while PATH exists, so a test can stop a campaign while it certainly
    has work left, however far a loaded machine got before the signal.
    """
    if not spec:
        return
    items = [i.strip() for i in spec.split(",")]
    pace = os.environ.get(SLEEP_ENV_VAR)
    if pace and not before and "sleep@*" in items:
        time.sleep(float(pace))  # pacing, not a fault: every epoch, restored attempts too
    gate = os.environ.get(GATE_ENV_VAR)
    if gate and before and "gate@*" in items:
        while os.path.exists(gate):  # held before every epoch while the file exists
            time.sleep(0.1)
    if restored:
        return
    for item in spec.split(","):
        kind, _, rest = item.strip().partition("@")
        at, _, cond = rest.partition(":")
        if at.strip() != str(epoch) or (kind in ("nan", "barrier")) != before:
            continue
        if cond:
            key, _, want = cond.partition("=")
            if cfg is None or str(getattr(cfg, key.strip(), None)) != want.strip():
                continue
        if kind == "barrier":
            directory, _, parties = os.environ[BARRIER_ENV_VAR].rpartition(":")
            barrier(directory, int(parties))
        if kind == "raise":
            raise RuntimeError(f"injected fault at epoch {epoch}")
        if kind == "kill":
            os.kill(os.getpid(), 9)
        if kind == "nan" and trainer is not None:
            import torch

            with torch.no_grad():
                next(trainer.model.parameters()).fill_(float("nan"))
