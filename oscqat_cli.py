"""Root of the ``oscqat`` console script: mounts each layer's commands.

It sits above every layer so the packages keep their one-way dependencies
(oscqat <- spaces <- search <- reports); each group imports its heavy libraries lazily.
The library's ``train`` and ``export`` commands get their MLflow hooks from ``reports.final`` here.
"""

from __future__ import annotations

import importlib

import typer

from oscqat.cli import make_train_command
from oscqat.export.cli import make_export_app
from reports.final import final_run_hook, log_export

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Oscillation-aware QAT: train, export, search spaces, search campaigns, reports.")
app.command("train")(make_train_command(final_run_hook))
app.add_typer(make_export_app(log_export), name="export")


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
    """Oscillation-aware QAT: train, export, search spaces, search campaigns, reports."""

for _module, _name in (("spaces.cli", "spaces"), ("search.cli", "search"), ("reports.cli", "report")):
    app.add_typer(importlib.import_module(_module).app, name=_name)


@app.command("ui")
def ui_command(
    campaign: str = typer.Argument(..., help="campaign name (under ./ray_results), directory, or YAML"),
) -> None:
    """Start the MLflow UI and optuna-dashboard on 127.0.0.1 for a campaign's stores (Ctrl-C stops both)."""
    from reports.cli import _open, _user_errors
    from reports.ui import serve

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
