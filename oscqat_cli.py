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


@app.callback()
def _root() -> None:
    """Oscillation-aware QAT: train, export, search spaces, search campaigns, reports."""


for _module, _name in (("spaces.cli", "spaces"), ("search.cli", "search"), ("reports.cli", "report")):
    app.add_typer(importlib.import_module(_module).app, name=_name)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
