"""Root of the ``oscqat`` console script: mounts each layer's commands.

It sits above every layer so the packages keep their one-way dependencies
(oscqat <- spaces <- search <- reports); each group imports its heavy libraries lazily.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Optional

import typer

from oscqat.cli import train

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Oscillation-aware QAT: train, search spaces, search campaigns, reports.")


@app.command("train")
def train_command(
    config: Path = typer.Argument(..., help="TrainConfig YAML file"),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="override the number of epochs"),
    as_json: bool = typer.Option(False, "--json", help='print {"epochs": [...], "final": {...}} on stdout'),
    out: Optional[Path] = typer.Option(None, "--out", help="directory for checkpoint.pt (resumable), model.pt, metrics.json"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress output"),
    no_track: bool = typer.Option(False, "--no-track", help="don't log an exported config's training to its campaign's MLflow"),
) -> None:
    """Train one model (QAT, or FP with bits: fp32) from a config file.

    A config written by `oscqat report export` (it starts with `# oscqat-source:`) is logged to its campaign's MLflow experiment as a run with role=final, unless --no-track is given.
    """
    if not no_track:
        try:  # the reports layer provides the MLflow hook; oscqat itself stays free of MLflow
            from reports.header import is_exported
        except ModuleNotFoundError:  # reports not installed: plain training
            is_exported = None
        if is_exported is not None and is_exported(config):
            from reports.final import train_from_export

            return train_from_export(config, epochs, as_json, out, quiet)
    train(config, epochs, as_json, out, quiet)


@app.callback()
def _root() -> None:
    """Oscillation-aware QAT: train, search spaces, search campaigns, reports."""

for _module, _name in (("spaces.cli", "spaces"), ("search.cli", "search"), ("reports.cli", "report")):
    try:
        _sub = importlib.import_module(_module)
    except ModuleNotFoundError as exc:  # a layer not installed yet
        if exc.name != _module:
            raise
        continue
    app.add_typer(_sub.app, name=_name)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
