"""MLflow from the driver: parent run per campaign x target, child run per trial.

One writer (the driver) means no SQLite lock fights and no route from cluster nodes to the
tracking server. After a driver restart the callback finds each trial's existing child run by
its trial-id tag and skips epochs already logged, so nothing is duplicated. Writes that fail
(server down) are buffered and retried on every later event and at the end.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path

from search.searcher import redact

log = logging.getLogger(__name__)


def __getattr__(name: str):
    """``MlflowTrialCallback`` lives in ``search.trial_callback`` (it imports Ray Tune, ~2 s), so
    the read-only commands that use the helpers here start fast."""
    if name == "MlflowTrialCallback":
        from search.trial_callback import MlflowTrialCallback

        return MlflowTrialCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

TAG = "oscqat."
SCALAR_METRICS = (
    "train_loss", "val_loss", "val_top1", "val_top1_no_bnre", "dampen_loss", "dampen_lambda", "freeze_threshold",
    "lr", "osc_frac", "osc_frac_depthwise", "osc_frac_pointwise", "frozen_frac", "epoch_time_s", "samples_per_s",
)
_SECRET_KEYS = ("password", "passwd", "secret", "token", "api_key", "apikey", "access_key", "credential")


def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    if uri.startswith(("http://", "https://")):
        # MLflow's defaults retry a refused connection for ~4 minutes per request: that would stall
        # the Tune driver on every event while a server is down (the callback buffers and retries
        # writes itself) and delay the pre-flight check. Settings the user made win.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        if redact(uri) != uri:  # MLflow prints "View run ... at: <tracking URI>", credentials included
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    return MlflowClient(tracking_uri=uri)


def parse_layer_osc(value) -> dict:
    """A result's ``layer_osc``: a JSON string from trials (a dict in older results)."""
    return json.loads(value) if isinstance(value, str) else dict(value)


def safe_value(key: str, value) -> str:
    """Stringify a param/tag value, dropping secrets (keys named like one; credentials in URIs)."""
    if any(s in key.lower() for s in _SECRET_KEYS):
        return "***"
    return redact(str(value))[:6000]


def get_or_create_experiment(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    return client.create_experiment(name)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# import name -> distributions that provide it, first found wins (mlflow-skinny provides `mlflow`
# without the server and UI, as on slim GPU images)
_DISTRIBUTIONS = {"oscqat": ("oscqat",), "torch": ("torch",), "torchvision": ("torchvision",), "timm": ("timm",),
                  "ray": ("ray",), "optuna": ("optuna",), "mlflow": ("mlflow", "mlflow-skinny")}


def library_versions() -> dict[str, str]:
    """Installed version per library, logged with every campaign (``missing`` when absent)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name, dists in _DISTRIBUTIONS.items():
        out[name] = "missing"
        for dist in dists:
            try:
                found = version(dist)
            except PackageNotFoundError:
                continue
            out[name] = found if dist == name else f"{found} ({dist})"
            break
    return out


def find_parent_run(client, experiment_id: str, campaign: str, target_label: str):
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG}campaign` = '{campaign}' and tags.`{TAG}target` = '{target_label}' "
                      f"and tags.`{TAG}role` = 'parent'",
        max_results=1,
    )
    return runs[0] if runs else None


def ensure_parent_run(client, experiment_id: str, campaign: str, target, tags: dict) -> str:
    """The target's parent run (reused when the campaign is resumed or re-run)."""
    existing = find_parent_run(client, experiment_id, campaign, target.label)
    if existing is not None:
        if existing.info.status != "RUNNING":
            client.update_run(existing.info.run_id, status="RUNNING")
        return existing.info.run_id
    all_tags = {f"{TAG}campaign": campaign, f"{TAG}role": "parent", f"{TAG}target": target.label,
                f"{TAG}arch": target.arch, f"{TAG}bits": target.bits, f"{TAG}git_commit": git_commit(),
                **{f"{TAG}version.{k}": v for k, v in library_versions().items()}, **tags}
    run = client.create_run(experiment_id, run_name=f"{campaign}/{target.label}",
                            tags={k: safe_value(k, v) for k, v in all_tags.items()})
    return run.info.run_id


def find_child_runs(client, experiment_id: str, parent_run_id: str) -> dict[str, object]:
    """``{tune trial id: run}`` for the parent's existing child runs."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                              max_results=50_000)
    return {r.data.tags.get(f"{TAG}trial_id"): r for r in runs if r.data.tags.get(f"{TAG}trial_id")}
