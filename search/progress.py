"""Compact live progress of one target's search, in place of Ray Tune's per-trial boxes.

Tune's own output (a status table per trial and event, hundreds of lines for a demo) is kept for
``oscqat search run --verbose``. Otherwise one line per target shows trials by state, the best
selection value so far and a bar; it is redrawn in place on a terminal and, when the output is
piped or logged, printed once per started and per finished trial so a log stays short and greppable.
"""

from __future__ import annotations

import os
import shutil
import sys
import time

from ray.tune import Callback

VERBOSE = False  # set by `oscqat search run/resume --verbose`: Tune's full output, no compact line


def tune_verbosity() -> int:
    """``RunConfig(verbose=...)``: Tune's status tables only when asked for."""
    return 1 if VERBOSE else 0


def progress_callbacks(target_label: str, num_samples: int, max_epochs: int) -> list:
    """The compact line, plus Tune's JSON and CSV loggers given explicitly: with Tune's automatic
    loggers off, no TensorBoard logger is added and Tune prints no TensorBoard hint into a temp dir
    (nobody reads TensorBoard here; ``report sync`` reads the JSON results)."""
    if VERBOSE:
        return []
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # the new output engine prints its boxes even at verbose=0
    quiet_libraries()
    return [TargetProgress(target_label, num_samples, max_epochs), JsonLoggerCallback(), CSVLoggerCallback()]


def set_verbose(verbose: bool) -> None:
    """Called by the CLI before anything is built: ``--verbose`` or the compact line."""
    global VERBOSE
    VERBOSE = verbose
    if not verbose:
        quiet_libraries()


def quiet_libraries() -> None:
    """Optuna's per-study INFO line and its "experimental feature" warnings (TPE's ``group``)."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def progress_line(label: str, done: int, total: int, counts: dict[str, int], best: tuple | None,
                  elapsed_s: float, width: int) -> str:
    """``label [bar] done/total · R running · C complete · P pruned · F failed · best ... · time``.

    Parts that do not fit ``width`` are dropped from the end (never cut inside a word or number);
    the bar shrinks first."""
    states = [f"{counts[k]} {name}" for k, name in (("RUNNING", "running"), ("COMPLETE", "complete"),
                                                     ("PRUNED", "pruned"), ("FAIL", "failed")) if counts.get(k)]
    best_text = "best -" if best is None else f"best {best[0]:.4f} ({best[2]}, {best[1]})"
    tail = [f"{done}/{total}", best_text, *states, _duration(elapsed_s)]
    head = label
    for bar_width in (20, 10, 0):
        if bar_width:
            filled = round(bar_width * done / total) if total else 0
            bar_part = ["[" + "#" * filled + "-" * (bar_width - filled) + "]"]
        else:
            bar_part = []
        parts = [head, *bar_part, *tail]
        line = " ".join(parts[:2 if bar_width else 1]) + " " + " · ".join(parts[2 if bar_width else 1:])
        if len(line) <= width:
            return line
    keep = [head]
    for part in tail:  # no bar at all: keep what fits, in order
        candidate = keep[0] + " " + " · ".join(keep[1:] + [part])
        if len(candidate) > width:
            break
        keep.append(part)
    return keep[0] + (" " + " · ".join(keep[1:]) if len(keep) > 1 else "")


class TargetProgress(Callback):
    """Driver-side Tune callback drawing the compact progress line (picklable for restore)."""

    REDRAW_S = 0.5

    def __init__(self, target_label: str, num_samples: int, max_epochs: int):
        self.target_label = target_label
        self.num_samples = num_samples
        self.max_epochs = max_epochs
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._states: dict[str, str] = {}  # trial id -> RUNNING | COMPLETE | PRUNED | FAIL
        self._best: tuple | None = None  # (val_top1, trial id, method)
        self._start = time.monotonic()
        self._drawn = 0.0
        self._live = False  # a line is drawn in place and needs a newline before other output

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_runtime()

    # drawing ------------------------------------------------------------------------------
    @staticmethod
    def _stream():
        return sys.stderr

    def _line(self, width: int) -> str:
        counts: dict[str, int] = {}
        for s in self._states.values():
            counts[s] = counts.get(s, 0) + 1
        done = sum(n for s, n in counts.items() if s != "RUNNING")
        return progress_line(self.target_label, done, max(self.num_samples, len(self._states)), counts, self._best,
                             time.monotonic() - self._start, width)

    def _draw(self, force: bool = False, event: str | None = None) -> None:
        stream = self._stream()
        width = shutil.get_terminal_size((120, 24)).columns - 1
        if stream.isatty():
            now = time.monotonic()
            if not force and now - self._drawn < self.REDRAW_S:
                return
            self._drawn = now
            stream.write("\r\x1b[K" + self._line(width))
            self._live = True
        elif event is not None:  # piped: one line per finished trial
            stream.write(f"{event}\n  {self._line(10_000)}\n")
        stream.flush()

    def _end_line(self) -> None:
        if self._live:
            self._stream().write("\n")
            self._live = False

    # Tune events ------------------------------------------------------------------------
    def on_trial_start(self, iteration, trials, trial, **info):
        self._states[trial.trial_id] = "RUNNING"
        # piped, a line per start too: a line printed only when a trial ends always shows one
        # running trial fewer than run at once (the finished one's successor has not started yet)
        self._draw(force=True, event=f"{self.target_label}: trial {trial.trial_id} ({_what(trial.config or {})}) "
                                     f"started")

    def on_trial_restore(self, iteration, trials, trial, **info):
        self._states[trial.trial_id] = "RUNNING"
        self._draw()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._states.setdefault(trial.trial_id, "RUNNING")
        self._draw()

    def on_trial_complete(self, iteration, trials, trial, **info):
        from search.searcher import trial_state

        result = trial.last_result or {}
        state = trial_state(result, False, self.max_epochs).name
        self._states[trial.trial_id] = state
        value = result.get("val_top1")
        method = _what(trial.config or {})
        if state == "COMPLETE" and isinstance(value, (int, float)) and (self._best is None or value > self._best[0]):
            self._best = (float(value), trial.trial_id, method)
        epochs = int(result.get("epoch", result.get("training_iteration", 0)))
        shown = f"{value:.4f}" if isinstance(value, (int, float)) else "-"
        what = {"COMPLETE": "complete", "PRUNED": f"pruned after epoch {epochs}", "FAIL": "failed"}[state]
        self._draw(force=True, event=f"{self.target_label}: trial {trial.trial_id} ({method}) {what}, "
                                     f"val_top1 {shown}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._states[trial.trial_id] = "FAIL"
        method = _what(trial.config or {})
        self._draw(force=True, event=f"{self.target_label}: trial {trial.trial_id} ({method}) failed")

    def on_experiment_end(self, trials, **info):
        self._draw(force=True)
        self._end_line()


def _what(config: dict) -> str:
    """A trial's method, or for a confirm run which search trial it retrains with which seed."""
    if "confirm_of" in config:
        return f"of {config['confirm_of']}, seed {config.get('seed')}"
    return str(config.get("method", "?"))
