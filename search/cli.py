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
    """Names and numbers never wrap or get cut (a folded ``efficientnet_lite0`` defeats grep): the
    table has only short columns; the best trials' params follow in ``_params_table``."""
    table = Table(title=title, title_justify="left",
                  caption="selected on val_top1 (the selection split); test = the held-out test split, never "
                          "selected on; confirmed = best mean val over the confirm seeds, test mean ± sample std",
                  caption_justify="left")
    cols = [("target", "left"), ("best\nval_top1", "right"), ("trial", "left"), ("method", "left"),
            ("complete/\npruned/failed", "right"), ("confirmed\nwinner", "left"), ("confirmed\nval (mean)", "right"),
            ("confirmed test\nmean ± std", "right")] + ([("status", "left")] if statuses else [])
    for col, justify in cols:
        table.add_column(col, no_wrap=True, justify=justify)
    for i, r in enumerate(results):
        table.add_row(r.target, f"{r.best_val_top1:.4f}" if r.best_val_top1 is not None else "-",
                      r.best_trial_id or "-", r.method or "-",
                      f"{r.counts.get('COMPLETE', 0)}/{r.counts.get('PRUNED', 0)}/{r.counts.get('FAIL', 0)}",
                      *_confirmed_cells(r), *([statuses[i]] if statuses else []))
    return table


def _confirmed_cells(r) -> list[str]:
    """Confirmed winner: trial (and ties), mean val, test mean ± sample std over seeds."""
    c = r.confirmed
    if not c:
        return ["-", "-", "-"]
    trial = c["trial_id"] + (f"\n(tie: {', '.join(r.confirm_ties)})" if r.confirm_ties else "")
    val = f"{c['val_top1_mean']:.4f} (n={len(c['seeds'])})"
    if c.get("test_top1_mean") is None:
        test = "-"
    elif c.get("test_top1_std") is None:
        test = f"{c['test_top1_mean']:.4f} (n=1)"
    else:
        test = f"{c['test_top1_mean']:.4f} ± {c['test_top1_std']:.4f}"
    return [trial, val, test]


def _params_table(results) -> Table:
    """The best trial's params per target; the cell folds between ``k=v`` items, never inside one."""
    table = Table(title="params of the best trials", title_justify="left")
    table.add_column("target", no_wrap=True)
    table.add_column("params", overflow="fold")
    for r in results:
        table.add_row(r.target, ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in sorted(r.params.items()) if k != "method") or "-")
    return table


def _print_results(results, title: str, statuses: list[str] | None = None) -> None:
    console.print(_results_table(results, title, statuses))
    if any(r.params for r in results):
        console.print(_params_table(results))


def _results_json(results, statuses: list[str] | None = None) -> str:
    import json

    rows = [{"target": r.target, "best_val_top1": r.best_val_top1, "best_trial_id": r.best_trial_id,
             "method": r.method, "params": r.params, "counts": r.counts, "confirmed": r.confirmed,
             "confirm_ties": r.confirm_ties or [],
             **({"status": statuses[i]} if statuses else {})} for i, r in enumerate(results)]
    return json.dumps(rows, indent=2) + "\n"


def command_prefix() -> str:
    """How to call this installation's tools: ``.venv/bin/`` when they are not on PATH (a
    README-literal user never activated the venv), else nothing."""
    import os
    import shutil

    here = Path(sys.argv[0]).resolve().parent if sys.argv and sys.argv[0] else None
    if here is None or not (here / "oscqat").exists():
        here = Path(sys.executable).parent
    found = shutil.which("oscqat")
    if found and Path(found).resolve().parent == here:
        return ""
    try:
        rel = os.path.relpath(here, Path.cwd())
    except ValueError:
        rel = str(here)
    return (str(here) if rel.startswith("..") else rel) + "/"


def _print_next_steps(campaign) -> None:
    from search.uris import redact

    bin_ = command_prefix()
    uri = redact(campaign.mlflow.tracking_uri)  # never print credentials
    lines = ["", "[bold]Next steps[/]", "  MLflow UI and Optuna dashboard (Ctrl-C stops them):",
             f"    {bin_}oscqat ui {campaign.name}"]
    if not uri.startswith("sqlite"):
        lines.append(f"    (MLflow tracking server: {uri})")
    lines += ["  Every trial of a target, and the targets side by side:",
              f"    {bin_}oscqat report trials {campaign.name} --target {campaign.targets[0].label}",
              f"    {bin_}oscqat report compare {campaign.name}",
              "  Export each target's winner, then train it:"]
    for target in campaign.targets:
        lines.append(f"    {bin_}oscqat report export {campaign.name} --target {target.label} --out best-{target.slug}.yaml")
    lines.append(f"    {bin_}oscqat train best-{campaign.targets[0].slug}.yaml")
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True)


VERBOSE_OPT = typer.Option(False, "--verbose", "-v", help="Ray Tune's full per-trial status output instead of the "
                                                          "compact progress line")


@app.command("run")
def run(
    campaign_file: Path = typer.Argument(..., help="campaign YAML"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray address (auto, ray://host:10001); default: local"),
    verbose: bool = VERBOSE_OPT,
) -> None:
    """Start a new campaign: one Optuna study + ASHA per target, every trial logged to MLflow."""
    from search import progress
    from search.campaign import load_campaign
    from search.runner import CampaignError, run_campaign
    from search.signals import CampaignInterrupted

    progress.set_verbose(verbose)
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
    _print_results(results, f"campaign {campaign.name}: best per target")
    _print_next_steps(campaign)


@app.command("resume")
def resume(
    name_or_path: str = typer.Argument(..., help="campaign name (under ./ray_results), directory, or YAML"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray address; default: the campaign's"),
    verbose: bool = VERBOSE_OPT,
) -> None:
    """Continue an interrupted campaign: unfinished and errored trials go on from their checkpoints."""
    from search import progress
    from search.campaign import load_campaign

    progress.set_verbose(verbose)
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
    _print_results(results, f"campaign {campaign.name}: best per target")
    _print_next_steps(campaign)


@app.command("status")
def status(
    name_or_path: str = typer.Argument(..., help="campaign name, directory, or YAML"),
    fmt: str = typer.Option("table", "--format", "-f", help="table | json"),
) -> None:
    """Trials by state per target and the best so far (reads Optuna; starts no Ray)."""
    if fmt not in ("table", "json"):
        raise fail(f"--format must be one of table, json, got {fmt!r}")
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
    if fmt == "json":
        sys.stdout.write(_results_json(results, statuses))
        return
    _print_results(results, f"campaign {campaign.name} ({campaign_dir})", statuses)
