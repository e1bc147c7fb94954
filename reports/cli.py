"""``oscqat report compare | export | html | plot | sync``: read a campaign back.

Every command takes the campaign by name (under ./ray_results), directory or YAML, and reads
MLflow and Optuna at the campaign's URIs unless --tracking-uri / --optuna-storage say otherwise.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from oscqat.cli import fail

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Compare trials, export the best config, plot and report a campaign.")
console = Console()
err_console = Console(stderr=True)

WIDE_TABLE_COLUMNS = 124  # below this terminal width, compare prints one small table per target
CAMPAIGN_ARG = typer.Argument(..., help="campaign name (under ./ray_results), directory, or YAML")
TRACKING_OPT = typer.Option(None, "--tracking-uri", help="MLflow tracking URI (default: the campaign's)")
OPTUNA_OPT = typer.Option(None, "--optuna-storage", help="Optuna storage URL (default: the campaign's)")


@contextmanager
def _user_errors():
    """Backend and input problems become one red line and an exit status, never a traceback."""
    from mlflow.exceptions import MlflowException

    from oscqat.config import ConfigError
    from reports.store import ReportError
    from search.uris import CredentialsMissing, install_log_redaction, redact

    install_log_redaction()
    try:
        yield
    except ReportError as exc:
        raise fail(redact(str(exc)), exc.code) from None
    except (ConfigError, CredentialsMissing) as exc:
        raise fail(redact(str(exc)), 2) from None
    except MlflowException as exc:
        raise fail(f"MLflow: {redact(str(exc)).splitlines()[0][:400]}", 1) from None
    except Exception as exc:  # noqa: BLE001 - database/network failures of the backends
        import requests
        import sqlalchemy.exc

        if isinstance(exc, (sqlalchemy.exc.SQLAlchemyError, requests.RequestException, OSError)):
            raise fail(f"backend failure: {exc.__class__.__name__}: {redact(str(exc)).splitlines()[0][:400]}", 1) from None
        raise


def _open(campaign: str, tracking_uri: str | None, optuna_storage: str | None):
    from reports.store import CampaignStore

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return CampaignStore.open(campaign, tracking_uri, optuna_storage)


@app.command("compare")
def compare(
    campaign: str = CAMPAIGN_ARG,
    fmt: str = typer.Option("table", "--format", "-f", help="table | csv | json | markdown"),
    tracking_uri: Optional[str] = TRACKING_OPT,
    optuna_storage: Optional[str] = OPTUNA_OPT,
) -> None:
    """Per target: best trial and its params, best plain LSQ vs best dampen/freeze, states, compute spent."""
    from reports import compare as cmp

    if fmt not in cmp.FORMATS:
        raise fail(f"--format must be one of {', '.join(cmp.FORMATS)}, got {fmt!r}")
    with _user_errors():
        store = _open(campaign, tracking_uri, optuna_storage)
        rows = cmp.compare_rows(store)
    if fmt == "table":
        title = f"campaign {store.campaign.name}: best per target"
        if console.width >= WIDE_TABLE_COLUMNS:
            console.print(cmp.rich_table(rows, title))
        else:
            for card in cmp.rich_cards(rows, title):
                console.print(card)
    else:
        text = {"csv": cmp.to_csv, "json": cmp.to_json, "markdown": cmp.to_markdown}[fmt](rows)
        sys.stdout.write(text)


@app.command("trials")
def trials(
    campaign: str = CAMPAIGN_ARG,
    target: Optional[str] = typer.Option(None, "--target", "-t", help="ARCH/BITS (default: every target)"),
    sort: str = typer.Option("number", "--sort", "-s", help="number | val_top1 | test_top1 | epochs | state | method"),
    fmt: str = typer.Option("table", "--format", "-f", help="table | csv | json"),
    tracking_uri: Optional[str] = TRACKING_OPT,
    optuna_storage: Optional[str] = OPTUNA_OPT,
) -> None:
    """Every trial of a target: state, epochs run, method, selection (val) and test top-1, key params."""
    from reports import trials as tr

    if fmt not in tr.FORMATS:
        raise fail(f"--format must be one of {', '.join(tr.FORMATS)}, got {fmt!r}")
    if sort not in tr.SORT_KEYS:
        raise fail(f"--sort must be one of {', '.join(tr.SORT_KEYS)}, got {sort!r}")
    with _user_errors():
        store = _open(campaign, tracking_uri, optuna_storage)
        targets = [store.target(target)] if target else store.targets
        per_target = [(t, tr.sort_rows(tr.trial_rows(store, t), sort)) for t in targets]
    if fmt == "table":
        for t, rows in per_target:
            for table in tr.rich_tables(rows, f"campaign {store.campaign.name}: {t.label}, {len(rows)} trials",
                                        console.width):
                console.print(table)
    else:
        rows = [r for _, rows in per_target for r in rows]
        sys.stdout.write(tr.to_csv(rows) if fmt == "csv" else tr.to_json(rows))


@app.command("export")
def export(
    campaign: str = CAMPAIGN_ARG,
    target: str = typer.Option(..., "--target", "-t", help="ARCH/BITS, e.g. demo_net/w3a3"),
    out: Path = typer.Option(..., "--out", "-o", help="YAML file to write (a complete TrainConfig)"),
    rank: Optional[int] = typer.Option(None, "--rank", min=1, help="export the N-th best COMPLETE search trial by "
                                       "final val_top1 instead of the confirmed winner (the default)"),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="epochs of the final training (default: the trial's)"),
    no_log: bool = typer.Option(False, "--no-log", help="don't log the file on the parent run / tag the trial run"),
    force: bool = typer.Option(False, "--force", help="overwrite --out if it exists"),
    tracking_uri: Optional[str] = TRACKING_OPT,
    optuna_storage: Optional[str] = OPTUNA_OPT,
) -> None:
    """Write a trial's complete TrainConfig as YAML for `oscqat train` (which then logs to the campaign)."""
    from reports.export import export_trial

    with _user_errors():
        store = _open(campaign, tracking_uri, optuna_storage)
        res = export_trial(store, target, out, rank=rank, epochs=epochs, log=not no_log, overwrite=force)
    err_console.print(f"exported trial {res.trial.trial_id} ({res.trial.method}) of {store.target(target).label}, "
                      f"{res.chosen_as} -> {res.path}"
                      + (f"; logged on parent run {res.parent_run_id}" if res.logged else ""), highlight=False)
    err_console.print(f"final training:  oscqat train {res.path}", highlight=False)


@app.command("html")
def html_report(
    campaign: str = CAMPAIGN_ARG,
    out: Path = typer.Option(..., "--out", "-o", help="output directory (index.html with its figures embedded, report.json)"),
    no_log: bool = typer.Option(False, "--no-log", help="don't log the report to MLflow"),
    tracking_uri: Optional[str] = TRACKING_OPT,
    optuna_storage: Optional[str] = OPTUNA_OPT,
) -> None:
    """One self-contained HTML file (figures embedded; works offline and mailed), logged once to MLflow."""
    from reports.html import build_report, figure_files, log_report

    with _user_errors():
        store = _open(campaign, tracking_uri, optuna_storage)
        manifest = build_report(store, out)
        parents = [] if no_log else log_report(store, out, manifest)
    n = len(figure_files(manifest))
    console.print(f"report: {out / 'index.html'} ({n} figures embedded, {len(manifest['sections'])} sections)"
                  + (f"; logged as report/index.html on parent run {parents[0]}" if parents else ""), highlight=False)


@app.command("plot")
def plot(
    campaign: str = CAMPAIGN_ARG,
    out: Path = typer.Option(..., "--out", "-o", help="output directory for the PNGs"),
    tracking_uri: Optional[str] = TRACKING_OPT,
    optuna_storage: Optional[str] = OPTUNA_OPT,
) -> None:
    """Only the report's PNG figures (no HTML, nothing logged)."""
    from reports.figures import campaign_figures

    with _user_errors():
        store = _open(campaign, tracking_uri, optuna_storage)
        figs = campaign_figures(store, out)
    all_figs = figs["overview"] + [f for v in figs["targets"].values() for f in v]
    for f in all_figs:
        if f.file:
            console.print(f"{out / f.file}", highlight=False)
        else:
            err_console.print(f"[dim]skipped {f.title}: {f.note}[/]", highlight=False)


@app.command("sync")
def sync(
    campaign: str = CAMPAIGN_ARG,
    tracking_uri: Optional[str] = TRACKING_OPT,
    optuna_storage: Optional[str] = OPTUNA_OPT,
) -> None:
    """Backfill MLflow from Ray's per-trial result.json files (after the tracking server was down)."""
    from rich.table import Table

    from reports.sync import sync_campaign

    with _user_errors():
        store = _open(campaign, tracking_uri, optuna_storage)
        summaries = sync_campaign(store)
    table = Table(title=f"campaign {store.campaign.name}: MLflow backfilled from Ray results")
    for col in ("target", "trials seen", "runs created", "epochs logged", "states set", "artifacts logged",
                "parent finished"):
        table.add_column(col, min_width=14 if col == "target" else None)
    for s in summaries:
        table.add_row(s.target, *(str(v) for v in (s.trials_seen, s.runs_created, s.epochs_logged, s.states_set,
                                                    s.artifacts_logged)), "yes" if s.parent_finished else "-")
    console.print(table)
