"""``oscqat search run | resume | status``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from oscqat.cli import fail
from oscqat.config import ConfigError

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Run, resume and inspect search campaigns.")
# Piped or logged output gets a wide console instead of rich's 80-column default (tables stay readable).
console = Console(width=None if sys.stdout.isatty() else 180)


def _fail(message: str, code: int = 2):
    """``fail`` with credentials removed from the message (errors often quote a store URI)."""
    from search.uris import redact

    return fail(redact(message), code=code)


def _interrupted(exc, name: str):
    """Exit 128 + signal number, as a shell reports a process stopped by that signal."""
    console.print(f"[yellow]campaign {name} {exc}[/]; nothing was marked done that is not. "
                  f"Continue with: [bold]oscqat search resume {name}[/]", highlight=False)
    return typer.Exit(128 + exc.signum)


def _setup_logging() -> None:
    from search.uris import install_log_redaction

    logging.basicConfig(level=logging.WARNING)
    install_log_redaction()


def _results_table(results, title: str, statuses: list[str] | None = None) -> Table:
    table = Table(title=title, caption="selected on val (the selection split); test = the held-out test split, "
                                       "never selected on; ± = sample std over the confirm seeds")
    cols = ["target", "best val_top1", "best trial", "method", "complete", "pruned", "failed", "params",
            "confirmed trial", "confirmed val", "confirmed test"]
    for col in cols + (["status"] if statuses else []):
        table.add_column(col, no_wrap=col in ("target", "best trial"))
    for i, r in enumerate(results):
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(r.params.items())
                           if k != "method")
        table.add_row(r.target, f"{r.best_val_top1:.4f}" if r.best_val_top1 is not None else "-",
                      r.best_trial_id or "-", r.method or "-", str(r.counts.get("COMPLETE", 0)),
                      str(r.counts.get("PRUNED", 0)), str(r.counts.get("FAIL", 0)), params or "-",
                      *_confirmed_cells(r), *([statuses[i]] if statuses else []))
    return table


def _confirmed_cells(r) -> list[str]:
    """Confirmed winner: trial (and ties), mean val, test mean ± sample std over seeds."""
    c = r.confirmed
    if not c:
        return ["-", "-", "-"]
    trial = c["trial_id"] + (f" (tie: {', '.join(r.confirm_ties)})" if r.confirm_ties else "")
    n = len(c["seeds"])
    val = f"{c['val_top1_mean']:.4f} (n={n})"
    if c.get("test_top1_mean") is None:
        test = "-"
    elif c.get("test_top1_std") is None:
        test = f"{c['test_top1_mean']:.4f} (n=1)"
    else:
        test = f"{c['test_top1_mean']:.4f} ± {c['test_top1_std']:.4f}"
    return [trial, val, test]


def _print_next_steps(campaign) -> None:
    from search import uris

    uri = uris.redact(campaign.mlflow.tracking_uri)  # never print credentials
    console.print(f"\nCompare trials in the MLflow UI:  [bold]mlflow ui --backend-store-uri {uri}[/]"
                  if uris.is_sqlite(uri) else f"\nCompare trials in the MLflow UI at {uri}")
    journal = uris.journal_file(campaign.optuna_storage)
    if uris.is_sqlite(campaign.optuna_storage):
        console.print(f"Optuna dashboard:                 [bold]optuna-dashboard {campaign.optuna_storage}[/]")
    elif journal is not None:
        console.print(f"Optuna dashboard:                 [bold]optuna-dashboard {journal}[/]")
    console.print(f"Export the winner:                [bold]oscqat report export {campaign.name} "
                  f"--target {campaign.targets[0].label} --out best.yaml[/]")


@app.command("run")
def run(
    campaign_file: Path = typer.Argument(..., help="campaign YAML"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray address (auto, ray://host:10001); default: local"),
) -> None:
    """Start a new campaign: one Optuna study + ASHA per target, every trial logged to MLflow."""
    from search.campaign import load_campaign
    from search.runner import CampaignError, run_campaign
    from search.signals import CampaignInterrupted

    _setup_logging()
    try:
        campaign = load_campaign(campaign_file)
    except ConfigError as exc:
        raise _fail(str(exc))
    try:
        results = run_campaign(campaign, address)
    except (ConfigError, ValueError) as exc:
        raise _fail(str(exc))
    except CampaignError as exc:
        raise _fail(str(exc), code=1)
    except CampaignInterrupted as exc:
        raise _interrupted(exc, campaign.name)
    console.print(_results_table(results, f"campaign {campaign.name}: best per target"))
    _print_next_steps(campaign)


@app.command("resume")
def resume(
    name_or_path: str = typer.Argument(..., help="campaign name (under ./ray_results), directory, or YAML"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray address; default: the campaign's"),
) -> None:
    """Continue an interrupted campaign: unfinished and errored trials go on from their checkpoints."""
    from search.campaign import load_campaign
    from search.runner import CAMPAIGN_FILE, CampaignError, locate_campaign, resume_campaign
    from search.signals import CampaignInterrupted

    _setup_logging()
    try:
        results = resume_campaign(name_or_path, address)
        campaign = load_campaign(locate_campaign(name_or_path) / CAMPAIGN_FILE)
    except (ConfigError, ValueError) as exc:
        raise _fail(str(exc))
    except CampaignError as exc:
        raise _fail(str(exc), code=1)
    except CampaignInterrupted as exc:
        raise _interrupted(exc, name_or_path)
    console.print(_results_table(results, f"campaign {campaign.name}: best per target"))
    _print_next_steps(campaign)


@app.command("status")
def status(name_or_path: str = typer.Argument(..., help="campaign name, directory, or YAML")) -> None:
    """Trials by state per target and the best so far (reads Optuna; starts no Ray)."""
    from search.campaign import load_campaign
    from search.runner import CAMPAIGN_FILE, CampaignError, locate_campaign, read_state, target_result

    try:
        campaign_dir = locate_campaign(name_or_path)
        campaign = load_campaign(campaign_dir / CAMPAIGN_FILE)
    except ConfigError as exc:
        raise _fail(str(exc))
    except CampaignError as exc:
        raise _fail(str(exc), code=1)
    state = read_state(campaign_dir)
    try:
        results = [target_result(campaign, t, state["targets"].get(t.label)) for t in campaign.targets]
    except ValueError as exc:  # a masked store URI whose credentials the environment lacks
        raise _fail(str(exc))
    statuses = [state["targets"].get(t.label, {}).get("status", "pending") for t in campaign.targets]
    console.print(_results_table(results, f"campaign {campaign.name} ({campaign_dir})", statuses))
