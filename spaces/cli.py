"""``oscqat spaces list`` / ``oscqat spaces show``: inspect shipped and user search spaces.

Mounted by the root CLI (``oscqat_cli``). The loader is imported inside the commands so that
``oscqat --help`` stays cheap; a SpaceError becomes one ``error:`` line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from oscqat.cli import fail

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Search spaces per architecture and bit-width.")


@app.callback()
def _group() -> None:
    """Search spaces per architecture and bit-width (shipped YAML files or your own)."""


@app.command("list")
def list_cmd(
    as_json: bool = typer.Option(False, "--json", help="print a JSON list on stdout (same as --format json)"),
    fmt: str = typer.Option("table", "--format", "-f", help="table | json"),
) -> None:
    """List the shipped spaces with their bit-widths and parameters."""
    if fmt not in ("table", "json"):
        raise fail(f"--format must be one of table, json, got {fmt!r}")
    as_json = as_json or fmt == "json"
    from spaces.errors import SpaceError
    from spaces.loader import list_spaces, load_space_file

    rows = []
    try:
        for name in list_spaces():
            f = load_space_file(name)
            params = list(f.spaces[f.bits[0]].params)
            rows.append({"space": name, "arch": f.arch, "bits": f.bits, "params": params, "source": f.source})
    except SpaceError as exc:
        raise fail(escape(str(exc)))
    if as_json:
        sys.stdout.write(json.dumps(rows) + "\n")
        return
    table = Table(title="search spaces")
    longest = max([len(p) for r in rows for p in r["params"]] + [10])
    # an "arch" column that repeats the space name only costs width; shown when some space differs
    show_arch = any(r["arch"] != r["space"] for r in rows)
    for col in ("space", "arch", "bit-widths", "parameters (base)"):  # names never wrap (grep finds them); the
        if col == "arch" and not show_arch:  # lists wrap between items
            continue
        table.add_column(col, no_wrap=col in ("space", "arch"), overflow="fold",
                         min_width=longest + 1 if col == "parameters (base)" else None)
    for r in rows:
        table.add_row(r["space"], *([r["arch"] or "any"] if show_arch else []), ", ".join(r["bits"]),
                      ", ".join(r["params"]))
    Console(width=None if sys.stdout.isatty() else 180).print(table)  # piped: wide, one row per line


@app.command("show")
def show_cmd(
    space: str = typer.Argument(..., help="shipped space name (see `oscqat spaces list`) or path to a YAML file"),
    bits: Optional[str] = typer.Option(None, "--bits", "-b", help="bit-width, e.g. w3a3 (default: all in the file)"),
    as_json: bool = typer.Option(False, "--json",
                                 help="print JSON on stdout: an object with --bits, a list of objects without"),
) -> None:
    """Show a resolved space (parameters, conditions) and its named starting points."""
    from spaces.errors import SpaceError
    from spaces.loader import load_space_file

    try:
        f = load_space_file(space)
        resolved = [f.resolve(bits)] if bits is not None else [f.spaces[b] for b in f.bits]
    except SpaceError as exc:
        raise fail(escape(str(exc)))
    if as_json:
        data = [r.to_dict() for r in resolved]
        sys.stdout.write(json.dumps(data[0] if bits is not None else data) + "\n")
        return
    console = Console()
    for r in resolved:
        console.print(_params_table(r))
        console.print(_points_table(r))


def _params_table(space) -> Table:
    table = Table(title=f"{space.name} {space.bits}  ({space.source})", title_justify="left")
    for col in ("parameter", "type", "range / choices / value", "when", "note"):
        table.add_column(col, overflow="fold")
    for name, spec in space.params.items():
        table.add_row(name, spec.type, escape(spec.describe()), escape(spec.condition_text()), escape(spec.help))
    return table


def _points_table(space) -> Table:
    """One column per starting point, one row per parameter ('-' where inactive)."""
    from spaces.schema import fmt_value

    table = Table(title=f"starting points of {space.name} {space.bits}", title_justify="left")
    table.add_column("parameter")
    for name in space.starting_point_names:
        table.add_column(escape(name), justify="right")
    points = space.starting_points
    for param in space.params:
        if any(param in pt for pt in points):
            table.add_row(param, *(escape(fmt_value(pt[param])) if param in pt else "-" for pt in points))
    return table
