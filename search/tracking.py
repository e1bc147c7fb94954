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

from oscqat.metrics import SCALAR_METRICS  # noqa: F401 - the one list of metric names
from search.uris import redact

log = logging.getLogger(__name__)


def __getattr__(name: str):
    """``MlflowTrialCallback`` lives in ``search.trial_callback`` (it imports Ray Tune, ~2 s), so
    the read-only commands that use the helpers here start fast."""
    if name == "MlflowTrialCallback":
        from search.trial_callback import MlflowTrialCallback

        return MlflowTrialCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

TAG = "oscqat."
# A trial run's params: these (what the trial is) plus what the search chose; the fixed rest of the
# config is on the parent run and in the run's train_config.yaml artifact.
IDENTITY_PARAMS = ("arch", "bits", "epochs")


def trial_param_values(config: dict, chosen: dict) -> dict:
    """The params a trial run logs: its identity from the full ``config`` plus the ``chosen`` ones."""
    return {**{k: config[k] for k in IDENTITY_PARAMS if k in config}, **chosen}
_SECRET_KEYS = ("password", "passwd", "secret", "token", "api_key", "apikey", "access_key", "credential")


def client_for(uri: str):
    """An MlflowClient; a masked URI (``user:***@``, as stored in files) gets its credentials back
    from this process or the environment (``search.uris.reveal``)."""
    from mlflow.tracking import MlflowClient

    from search.uris import reveal

    uri = reveal(uri)
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


def complete_osc_history(trial, history: list[dict]) -> list[dict]:
    """The driver holds per-layer oscillation only for epochs it saw itself: after a driver restart
    the earlier epochs come from the trial's ``result.json`` (local storage), which Ray wrote for all."""
    have = {h["epoch"] for h in history}
    dirs = [str(d) for d in (getattr(trial, "local_path", None), getattr(trial, "path", None)) if d]
    path = next((Path(d) / "result.json" for d in dirs if "://" not in d and (Path(d) / "result.json").is_file()),
                None)  # local_path: where the driver writes result.json; path: the storage copy
    if path is None:
        return history
    older = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            r = json.loads(line)
            epoch = int(r.get("epoch", 0))
            if epoch not in have and r.get("layer_osc") and not r.get("failure_reason"):
                older[epoch] = {"epoch": epoch, "layers": parse_layer_osc(r["layer_osc"])}
        except (ValueError, TypeError, AttributeError):
            continue
    return sorted([*older.values(), *history], key=lambda h: h["epoch"])


def safe_value(key: str, value) -> str:
    """Stringify a param/tag value, dropping secrets (keys named like one; credentials in URIs)."""
    if any(s in key.lower() for s in _SECRET_KEYS):
        return "***"
    return redact(str(value))[:6000]


# MLflow 3 opens an experiment without this tag in its GenAI layout (traces, judges, evaluation runs)
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def get_or_create_experiment(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        if EXPERIMENT_KIND_TAG not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})


# names and descriptions a person reads in the MLflow UI ---------------------------------------
def trial_run_name(target_label: str, method: str | None, trial_id: str, state: str | None = None,
                   epochs: int | None = None) -> str:
    """``w3a3 · dampen · f9ba8107`` (the parent run names the architecture); a finished trial that
    did not complete says so: ``· pruned at epoch 2`` or ``· FAILED``."""
    name = f"{target_label.rsplit('/', 1)[-1]} · {method or '?'} · {trial_id}"
    if state == "PRUNED":
        name += f" · pruned at epoch {epochs}" if epochs else " · pruned"
    elif state == "FAIL":
        name += " · FAILED"
    return name


def parent_run_name(campaign: str, target) -> str:
    return f"{campaign} · {target.arch} {target.bits} · search"


def trial_description(state: str, epochs: int, max_epochs: int, result: dict, reason: str | None) -> str:
    """The run's markdown description (``mlflow.note.content``): what happened to the trial."""
    top1 = result.get("val_top1")
    top1_text = f"{top1:.4f}" if isinstance(top1, (int, float)) else "-"
    if state == "COMPLETE":
        return f"**Complete**: trained all {max_epochs} epochs; selection val_top1 {top1_text}."
    if state == "PRUNED":
        return (f"**Pruned** (not a failure): ASHA stopped this trial after epoch {epochs} of {max_epochs} because "
                f"others were better at that rung; val_top1 {top1_text} at that point.")
    return f"**Failed** after epoch {epochs} of {max_epochs}: {reason or 'see the failure_reason tag'}."


VIEW_KEY = "oscqat-trials"  # the experiment's saved runs view: ``#/experiments/<id>/runs?viewStateShareKey=...``
VIEW_COLUMNS = ["metrics.`val_top1`", "metrics.`test_top1`", "params.`method`", f"tags.`{TAG}state`",
                f"tags.`{TAG}epochs`", f"tags.`{TAG}stage`"]


def write_trials_view(client, experiment_id: str) -> None:
    """Save a runs view on the experiment: trials grouped under their parent, every group expanded,
    with the columns a person compares trials by (MLflow shows none until they are ticked)."""
    parents = client.search_runs([experiment_id], filter_string=f"tags.`{TAG}role` = 'parent'", max_results=1000)
    view = {"groupBy": {"aggregateFunction": "max",
                        "groupByKeys": [{"mode": "tag", "groupByData": "mlflow.parentRunId"}]},
            "groupsExpanded": {f"tag.mlflow.parentRunId.{p.info.run_id}": True for p in parents},
            "selectedColumns": VIEW_COLUMNS, "orderByKey": "metrics.`val_top1`", "orderByAsc": False}
    client.set_experiment_tag(experiment_id, f"mlflow.sharedViewState.{VIEW_KEY}", json.dumps(view))


def parent_description(campaign, target, space_name: str | None, searched: list[str], experiment_id: str,
                       best: dict | None = None) -> str:
    """The parent run's markdown description: what was searched, the budget, the best trial, how to export."""
    b = campaign.budget
    lines = [f"### {target.arch} {target.bits}: search of campaign `{campaign.name}`", "",
             f"- **Searched** ({space_name or 'space'}): {', '.join(f'`{p}`' for p in searched) or '-'}",
             f"- **Budget**: {b.num_samples} trials, up to {b.max_epochs} epochs each"
             + (f" (ASHA: grace {b.grace_period}, factor {b.reduction_factor:g})" if b.scheduler == "asha" else ""),
             "- **Selection metric**: `val_top1` on the selection split (the searcher and ASHA see only this)"]
    if best:
        # workflowType: without it a browser new to this MLflow opens the run in the GenAI view
        link = (f"[{best['trial_id']}](#/experiments/{experiment_id}/runs/{best['run_id']}"
                "?workflowType=machine_learning)") if best.get("run_id") \
            else f"`{best['trial_id']}`"
        counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(best.get("counts", {}).items()))
        lines += [f"- **Best trial**: {link} ({best.get('method') or '?'}), val_top1 {best['val_top1']:.4f}",
                  f"- **Trials**: {counts}" if counts else ""]
    lines += ["", "Export and train the winner:", "",
              f"    oscqat report export {campaign.name} --target {target.label} --out best.yaml",
              "    oscqat train best.yaml"]
    return "\n".join(line for line in lines if line is not None)


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


def ensure_parent_run(client, experiment_id: str, campaign: str, target, tags: dict,
                      base_params: dict | None = None) -> str:
    """The target's parent run (reused when the campaign is resumed or re-run). ``base_params``: the
    config every trial shares, logged here once (trials log only what the search chose)."""
    existing = find_parent_run(client, experiment_id, campaign, target.label)
    if existing is not None:
        if existing.info.status != "RUNNING":
            client.update_run(existing.info.run_id, status="RUNNING")
        return existing.info.run_id
    all_tags = {f"{TAG}campaign": campaign, f"{TAG}role": "parent", f"{TAG}target": target.label,
                f"{TAG}arch": target.arch, f"{TAG}bits": target.bits, f"{TAG}git_commit": git_commit(),
                **{f"{TAG}version.{k}": v for k, v in library_versions().items()}, **tags}
    run = client.create_run(experiment_id, run_name=parent_run_name(campaign, target),
                            tags={k: safe_value(k, v) for k, v in all_tags.items()})
    if base_params:
        from search.run_writer import param_batches

        for batch in param_batches(base_params):
            client.log_batch(run.info.run_id, params=batch)
    try:
        write_trials_view(client, experiment_id)
    except Exception as exc:  # noqa: BLE001 - a view is a convenience, never a reason to stop
        log.warning("could not save the MLflow runs view: %s", exc.__class__.__name__)
    return run.info.run_id


def describe_parent(client, experiment_id: str, parent_id: str, campaign, target, space, result=None) -> None:
    """Write the parent's markdown description (and refresh the saved view); ``result``: the target's
    ``TargetResult`` once its search finished, for the best trial and its link."""
    best = None
    if result is not None and result.best_val_top1 is not None:
        run = find_child_runs(client, experiment_id, parent_id).get(result.best_trial_id)
        best = {"trial_id": result.best_trial_id, "run_id": run.info.run_id if run else None, "method": result.method,
                "val_top1": result.best_val_top1, "counts": result.counts}
    text = parent_description(campaign, target, getattr(space, "name", None), list(getattr(space, "params", {})),
                              experiment_id, best)
    try:
        client.set_tag(parent_id, "mlflow.note.content", text)
        write_trials_view(client, experiment_id)
    except Exception as exc:  # noqa: BLE001 - descriptive only
        log.warning("could not describe the parent run of %s: %s", target.label, exc.__class__.__name__)


def find_child_runs(client, experiment_id: str, parent_run_id: str) -> dict[str, object]:
    """``{tune trial id: run}`` for the parent's existing child runs."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                              max_results=50_000)
    return {r.data.tags.get(f"{TAG}trial_id"): r for r in runs if r.data.tags.get(f"{TAG}trial_id")}
