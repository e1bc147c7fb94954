"""``oscqat train``: run one QAT (or FP) training from a TrainConfig YAML.

Lives in ``oscqat`` so the library is usable without the search stack; the root CLI
(``oscqat_cli``) mounts it next to the ``spaces``, ``search`` and ``report`` groups.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from oscqat.config import ConfigError, TrainConfig

err_console = Console(stderr=True)

SUMMARY_COLUMNS = {  # metric -> short header
    "epoch": "ep", "train_loss": "train loss", "val_loss": "val loss", "val_top1": "top1",
    "val_top1_no_bnre": "top1 (no BN re-est.)", "osc_frac": "osc", "frozen_frac": "frozen",
    "dampen_lambda": "lambda", "freeze_threshold": "f_th", "epoch_time_s": "s",
}


def fail(message: str, code: int = 2) -> "typer.Exit":
    """Print a user-facing error (no traceback) and return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
    return typer.Exit(code)


def load_train_config(path: Path, epochs: Optional[int] = None) -> TrainConfig:
    return TrainConfig.from_yaml(path, epochs=epochs)


def run_training(cfg: TrainConfig, out: Optional[Path] = None, quiet: bool = False,
                 on_epoch: Callable[[dict, "object"], None] | None = None) -> tuple[list[dict], "object"]:
    """Train ``cfg`` to completion with a progress bar; resume from ``out/checkpoint.pt`` if present."""
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
        trainer.save_model(out / "model.pt")
        (out / "metrics.json").write_text(json.dumps({"epochs": trainer.history}, indent=2))
        (out / "config.yaml").write_text(cfg.to_yaml())
    return trainer.history, trainer


def results_table(history: list[dict]) -> Table:
    table = Table(title="training results")
    for header in SUMMARY_COLUMNS.values():
        table.add_column(header, justify="right")
    for m in history:
        table.add_row(*(f"{m[c]:.4f}" if isinstance(m[c], float) else str(m[c]) for c in SUMMARY_COLUMNS))
    return table


def train(
    config: Path = typer.Argument(..., help="TrainConfig YAML file"),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="override the number of epochs"),
    as_json: bool = typer.Option(False, "--json", help='print {"epochs": [...], "final": {...}} on stdout'),
    out: Optional[Path] = typer.Option(None, "--out", help="directory for checkpoint.pt (resumable), model.pt, metrics.json"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress output"),
) -> None:
    """Train one model (QAT, or FP with bits: fp32) from a config file."""
    try:
        cfg = load_train_config(config, epochs)
    except ConfigError as exc:
        raise fail(str(exc))
    try:
        history, _ = run_training(cfg, out, quiet=quiet or as_json)
    except (FileNotFoundError, ValueError, RuntimeError, FloatingPointError) as exc:  # incl. NonFiniteLossError, QuantizerCollapseError (names the layer)
        raise fail(f"{config}: {exc}", code=1)
    if as_json:
        sys.stdout.write(json.dumps({"epochs": history, "final": history[-1]}) + "\n")
    else:
        Console().print(results_table(history))
