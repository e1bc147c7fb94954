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


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"oscqat {version('oscqat')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            typer.echo("oscqat (not installed)")
        raise typer.Exit()


@app.callback()
def _root(
    _show_version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the version and exit"),
) -> None:
    """Oscillation-aware QAT: train, search spaces, search campaigns, reports."""

for _module, _name in (("spaces.cli", "spaces"), ("search.cli", "search"), ("reports.cli", "report")):
    try:
        _sub = importlib.import_module(_module)
    except ModuleNotFoundError as exc:  # a layer not installed yet
        if exc.name != _module:
            raise
        continue
    app.add_typer(_sub.app, name=_name)


@app.command("ui")
def ui_command(
    campaign: str = typer.Argument(..., help="campaign name (under ./ray_results), directory, or YAML"),
) -> None:
    """Start the MLflow UI and optuna-dashboard on 127.0.0.1 for a campaign's stores (Ctrl-C stops both)."""
    try:
        from reports.cli import _open, _user_errors
        from reports.ui import serve
    except ModuleNotFoundError as exc:
        from oscqat.cli import fail

        raise fail(f"`oscqat ui` needs the search and reports layers ({exc.name} is missing)", 1) from None
    with _user_errors():
        store = _open(campaign, None, None)
        store.experiment_id  # noqa: B018 - a missing experiment is a clear error before any server starts
    raise typer.Exit(serve(store, echo=typer.echo))


def clean_help(command) -> None:
    """Help reads as prose: no ``<bool>`` beside flags, arguments shown as ``CONFIG`` not ``{config}``."""
    for param in getattr(command, "params", []):  # typer's own click types: told apart by duck typing
        kind = getattr(param, "param_type_name", None)
        if kind == "option" and getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
        elif kind == "argument" and param.metavar is None:
            name = param.name.upper()
            param.metavar = name
            usage = name if param.required else f"[{name}]"  # typer would write {NAME} for a required one
            param._usage_display_name = lambda usage=usage: usage
    get_help_option = getattr(command, "get_help_option", None)
    if get_help_option is not None:
        def _help_option(ctx, _get=get_help_option):
            option = _get(ctx)
            if option is not None:
                option.metavar = ""
            return option

        command.get_help_option = _help_option
    for sub in getattr(command, "commands", {}).values():
        clean_help(sub)


def main() -> None:
    command = typer.main.get_command(app)
    clean_help(command)
    command()


if __name__ == "__main__":
    main()
