"""Root of the ``oscqat`` console script: mounts each layer's commands.

It sits above every layer so the packages keep their one-way dependencies
(oscqat <- spaces <- search <- reports); each group imports its heavy libraries lazily.
"""

from __future__ import annotations

import importlib

import typer

from oscqat.cli import train

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Oscillation-aware QAT: train, search spaces, search campaigns, reports.")
app.command("train")(train)


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
