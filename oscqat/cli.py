"""``oscqat train``: run one QAT (or FP) training from a TrainConfig YAML.

Lives in ``oscqat`` so the library is usable without the search stack; the root CLI
(``oscqat_cli``) mounts it next to the ``spaces``, ``search`` and ``report`` groups.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Optional, Protocol

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from oscqat.config import ConfigError, TrainConfig

MODEL_FILE = "model.pt"  # oscqat.export.bundle.MODEL_FILE (not imported here: it pulls in torch)

err_console = Console(stderr=True)

# metric -> (header, format); headers are short and numbers have fixed widths so the table fits
# 80 columns; optional columns are dropped (last first) on narrower terminals, never cut.
SUMMARY_COLUMNS = {
    "epoch": ("ep", "d"), "val_top1": ("top1", ".4f"), "val_top1_no_bnre": ("top1\nno BNre", ".4f"),
    "osc_frac": ("osc", ".4f"), "frozen_frac": ("frozen", ".4f"), "train_loss": ("train\nloss", ".3f"),
    "val_loss": ("val\nloss", ".3f"), "dampen_lambda": ("lambda", ".3g"), "freeze_threshold": ("f_th", ".3g"),
    "epoch_time_s": ("s", ".1f"),
}
ESSENTIAL_COLUMNS = ("epoch", "val_top1")
DROP_ORDER = ("epoch_time_s", "val_loss", "freeze_threshold", "dampen_lambda", "train_loss", "val_top1_no_bnre",
              "frozen_frac", "osc_frac")  # first dropped first when the terminal is too narrow
RESULTS_NOTE = "top1 = val top-1 after BN re-estimation; no BNre = with running BN statistics"


def fail(message: str, code: int = 2) -> "typer.Exit":
    """Print a user-facing error (no traceback) and return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
    return typer.Exit(code)


def load_train_config(path: Path, epochs: Optional[int] = None) -> TrainConfig:
    return TrainConfig.from_yaml(path, epochs=epochs)


def run_training(cfg: TrainConfig, out: Optional[Path] = None, quiet: bool = False,
                 on_epoch: Callable[[dict, "object"], None] | None = None) -> tuple[list[dict], "object"]:
    """Train ``cfg`` to completion with a progress bar; resume from ``out/checkpoint.pt`` if present."""
    from oscqat.export.bundle import save_trained_model
    from oscqat.trainer import Trainer

    ckpt = out / "checkpoint.pt" if out else None
    if ckpt is not None and ckpt.is_file():
        trainer = Trainer.load(ckpt, config=cfg)
        err_console.print(f"resuming from {ckpt} at epoch {trainer.epoch}/{cfg.epochs}")
    else:
        trainer = Trainer(cfg)
    columns = (TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn())
    with Progress(*columns, console=err_console, disable=quiet, transient=True) as progress:
        while not trainer.done:
            task = progress.add_task("train", total=trainer.steps_per_epoch, epoch=f"{trainer.epoch + 1}/{cfg.epochs}",
                                     loss=float("nan"))
            metrics = trainer.run_epoch(on_batch=lambda i, loss: progress.update(task, completed=i, loss=loss))
            progress.remove_task(task)
            if not quiet:
                err_console.print(
                    f"epoch {metrics['epoch']}/{cfg.epochs}  val_top1 {metrics['val_top1']:.4f}  "
                    f"(no BN re-est. {metrics['val_top1_no_bnre']:.4f})  osc {metrics['osc_frac']:.4f}  "
                    f"frozen {metrics['frozen_frac']:.4f}", highlight=False)
            if ckpt is not None:
                trainer.save(ckpt)
            if on_epoch is not None:
                on_epoch(metrics, trainer)
    if out is not None:
        save_trained_model(trainer, out / MODEL_FILE)
        (out / "metrics.json").write_text(json.dumps({"epochs": trainer.history}, indent=2))
        (out / "config.yaml").write_text(cfg.to_yaml())
    return trainer.history, trainer


def _cell(value, fmt: str) -> str:
    if value is None:
        return "-"
    return format(value, fmt) if fmt != "d" else str(int(value))


def results_table(history: list[dict], width: int = 80) -> Table:
    """Per-epoch results that fit ``width`` columns: columns with no value are left out, then
    optional ones (``DROP_ORDER``) until it fits; a number is never wrapped or cut. The caption
    names what was left out (all of it is in ``--json`` and ``metrics.json``)."""
    from rich.console import Console as _Console
    from rich.measure import Measurement

    cols = [c for c in SUMMARY_COLUMNS if c in ESSENTIAL_COLUMNS or any(m.get(c) is not None for m in history)]
    dropped: list[str] = []

    def build() -> Table:
        caption = RESULTS_NOTE + (f"; not shown at {width} columns: {', '.join(dropped)} (see --json)" if dropped
                                  else "")
        table = Table(title="training results", caption=caption)
        for c in cols:
            table.add_column(SUMMARY_COLUMNS[c][0], justify="right", no_wrap=True)
        for m in history:
            table.add_row(*(_cell(m.get(c), SUMMARY_COLUMNS[c][1]) for c in cols))
        return table

    probe = _Console(width=10_000, file=None, record=False)
    table = build()
    for c in DROP_ORDER:
        if Measurement.get(probe, probe.options, table).maximum <= width:
            break
        if c in cols:
            cols.remove(c)
            dropped.append(SUMMARY_COLUMNS[c][0].replace("\n", " "))
            table = build()
    return table


class TrainHook(Protocol):
    """What a caller above the library adds to a training (e.g. ``reports.final``: an MLflow run).

    ``start`` returns a line for the user (or ""), ``finish`` is called once with FINISHED,
    FAILED or KILLED and returns a closing line; ``summary`` adds keys to ``--json``.
    """

    def start(self, cfg: TrainConfig) -> str: ...
    def on_epoch(self, metrics: dict, trainer) -> None: ...
    def finish(self, status: str, cfg: TrainConfig, trainer) -> str: ...
    def summary(self) -> dict: ...


HookFactory = Callable[[Path, Path], Optional[TrainHook]]  # (config file, out dir) -> hook or None


def default_out_dir(config: Path) -> Path:
    """``$OSCQAT_RUNS_DIR`` (default ``./runs``) / ``<config stem>-<UTC time>``: every run keeps its model."""
    import os
    import time

    root = Path(os.environ.get("OSCQAT_RUNS_DIR") or "runs")
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    out, i = root / f"{config.stem}-{stamp}", 1
    while out.exists():
        i += 1
        out = root / f"{config.stem}-{stamp}-{i}"
    return out


def make_train_command(hook_for: HookFactory | None = None):
    """The ``oscqat train`` command; ``hook_for`` may attach a ``TrainHook`` (the root CLI passes
    the reports layer's final-run tracking, so this library never imports MLflow)."""

    def train(
        config: Path = typer.Argument(..., help="TrainConfig YAML file"),
        epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="override the number of epochs"),
        as_json: bool = typer.Option(False, "--json", help='print {"epochs": [...], "final": {...}, "out": DIR} on stdout'),
        out: Optional[Path] = typer.Option(None, "--out", help="directory for checkpoint.pt (resumable), model.pt, "
                                           "metrics.json, config.yaml (default: a new one under ./runs, printed)"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress output"),
        no_track: bool = typer.Option(False, "--no-track", help="don't log an exported config's training to its campaign's MLflow"),
    ) -> None:
        """Train one model (QAT, or FP with bits: fp32) from a config file; the model is kept in the output directory.

        A config written by `oscqat report export` (it starts with `# oscqat-source:`) is logged to its campaign's MLflow experiment as a run with role=final and stage=final, model included, unless --no-track is given.
        """
        try:
            cfg = load_train_config(config, epochs)
        except ConfigError as exc:
            raise fail(str(exc))
        out_dir = out or default_out_dir(config)
        hook = None if (no_track or hook_for is None) else hook_for(config, out_dir)
        talk = not (quiet or as_json)
        if hook is not None:
            line = hook.start(cfg)
            if line and (talk or line.startswith("[yellow]")):
                err_console.print(line, highlight=False)
        state: dict = {}

        def on_epoch(metrics, trainer):
            state["trainer"] = trainer
            if hook is not None:
                hook.on_epoch(metrics, trainer)

        try:
            history, trainer = run_training(cfg, out_dir, quiet=quiet or as_json, on_epoch=on_epoch)
        except KeyboardInterrupt:
            if hook is not None:
                hook.finish("KILLED", cfg, state.get("trainer"))
            raise
        except (FileNotFoundError, ValueError, RuntimeError, FloatingPointError) as exc:  # incl. NonFiniteLossError
            if hook is not None:
                hook.finish("FAILED", cfg, state.get("trainer"))
            raise fail(f"{config}: {exc}", code=1)
        closing = hook.finish("FINISHED", cfg, trainer) if hook is not None else ""
        if as_json:
            extra = hook.summary() if hook is not None else {}
            sys.stdout.write(json.dumps({"epochs": history, "final": history[-1], "out": str(out_dir), **extra}) + "\n")
            return
        console = Console()
        console.print(results_table(history, console.width))
        final = history[-1]
        console.print(f"model: {final['model_size_kb']:.1f} KiB packed weights, {final['bops_g']:.4g} GBOPs per image",
                      highlight=False)
        console.print(f"model saved in {out_dir}/{MODEL_FILE} (export: oscqat export onnx {out_dir})", highlight=False,
                      soft_wrap=True)  # a path is never broken across lines
        if closing:
            console.print(closing, highlight=False)

    return train


train = make_train_command()  # the library's own command: plain training, no tracking hook
