"""Run and resume campaigns: one Optuna study + ASHA + Tuner per target, MLflow from the driver.

Layout under ``storage_path/<campaign>/``: ``campaign.yaml`` (the validated campaign),
``state.json`` (per-target progress, parent run ids, study names), ``fp/<arch>.pt`` (the
shared FP checkpoints) and one Ray Tune experiment folder per target.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import yaml

from oscqat.config import ConfigError
from search.campaign import Campaign, Target, load_campaign
from search.results import (TargetResult, confirmed_result, summarise_parent,  # noqa: F401 - re-exported
                            target_result)
from search.state import (ACTIVE_PHASES, CAMPAIGN_FILE, STATE_FILE, CampaignError,  # noqa: F401 - re-exported
                          locate_campaign, read_state, write_state)
from search import uris
from search.uris import redact

log = logging.getLogger(__name__)


# pre-flight checks ---------------------------------------------------------------
def check_backends(campaign: Campaign) -> str:
    """Fail fast, before Ray starts, when MLflow or the Optuna storage is unusable."""
    from search.searcher import make_storage
    from search.tracking import client_for, get_or_create_experiment

    try:
        storage = make_storage(campaign.optuna_storage)
        storage.get_all_studies()
    except Exception as exc:  # noqa: BLE001
        raise CampaignError(f"Optuna storage {redact(campaign.optuna_storage)!r} is unusable: "
                            f"{exc.__class__.__name__}: {redact(str(exc)).splitlines()[0][:300]}") from None
    try:
        client = client_for(campaign.mlflow.tracking_uri)
        return get_or_create_experiment(client, campaign.experiment_name)
    except Exception as exc:  # noqa: BLE001
        raise CampaignError(f"MLflow tracking URI {redact(campaign.mlflow.tracking_uri)!r} is unreachable or unusable: "
                            f"{exc.__class__.__name__}: {redact(str(exc)).splitlines()[0][:300]}") from None


def _check_rungs(campaign: Campaign, spaces: dict) -> None:
    """Refuse (ConfigError, exit 2) a grace period that would stop remedies before they act."""
    from oscqat.config import ConfigError
    from search.rungs import check_campaign_rungs

    try:
        check_campaign_rungs(campaign, spaces)
    except ValueError as exc:
        raise ConfigError(f"campaign {campaign.name!r}: invalid configuration\n  {exc}") from None


def _resolve_spaces(campaign: Campaign) -> dict:
    from spaces import load_space

    return {t.label: load_space(campaign.space_for(t), t.bits) for t in campaign.targets}


# Ray -----------------------------------------------------------------------------
def init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    _keep_secrets_out_of_runtime_env()
    kwargs = dict(include_dashboard=False, log_to_driver=True, configure_logging=True, logging_level=logging.WARNING)
    if address:
        ray.init(address=address, **kwargs)
    else:
        # local instance: reachable from this machine only, its session files (logs with each
        # worker's environment) readable by this user only
        temp_dir = private_ray_temp_dir()
        ray.init(_node_ip_address="127.0.0.1", **({"_temp_dir": str(temp_dir)} if temp_dir else {}), **kwargs)


def private_ray_temp_dir() -> Path | None:
    """``$TMPDIR/oscqat-ray-<uid>`` (or ``OSCQAT_RAY_TMPDIR``), mode 0700: Ray's default ``/tmp/ray``
    is world-readable. A ``RAY_TMPDIR`` the user set is Ray's to use (None), made private if ours."""
    import tempfile

    if os.environ.get("RAY_TMPDIR") and not os.environ.get("OSCQAT_RAY_TMPDIR"):
        path = Path(os.environ["RAY_TMPDIR"])
        if path.is_dir() and path.stat().st_uid == os.getuid():
            path.chmod(0o700)
        return None
    path = Path(os.environ.get("OSCQAT_RAY_TMPDIR") or Path(tempfile.gettempdir()) / f"oscqat-ray-{os.getuid()}")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_uid != os.getuid():
        raise CampaignError(f"{path} belongs to another user; set OSCQAT_RAY_TMPDIR to a directory of your own")
    path.chmod(0o700)
    return path


# Ray Tune copies these from the driver's environment into every trial actor's runtime_env, which
# Ray records in its session logs and GCS. Local workers inherit the environment anyway; cluster
# nodes get credentials from their own environment or instance role (docs/RELIABILITY.md).
SECRET_ENV_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN")


def _keep_secrets_out_of_runtime_env() -> None:
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE.difference_update(SECRET_ENV_VARS)


def _fp_checkpoint(campaign: Campaign, target: Target, campaign_dir: Path) -> tuple[str, dict]:
    """Path and state of the target's FP checkpoint: given, already made, or trained now (once)."""
    import torch

    if target.pretrained:
        from oscqat.models.registry import safe_torch_load  # ValueError (exit 2) for a file needing unpickling

        path = Path(target.pretrained).expanduser().resolve()
        return str(path), safe_torch_load(path)
    path = campaign_dir / "fp" / f"{target.arch}.pt"
    if not path.is_file():
        import ray

        from oscqat.config import TrainConfig

        fp_cfg = TrainConfig.model_validate({
            **{k: v for k, v in campaign.base.items() if k in ("data_dir", "download", "image_size", "val_fraction",
                                                                "selection_fraction", "batch_size", "num_workers",
                                                                "device")},
            "arch": target.arch, "bits": "fp32", "dataset": campaign.dataset, "seed": campaign.seed,
            "epochs": campaign.fp_pretrain.epochs, "lr": campaign.fp_pretrain.lr,
            "weight_decay": campaign.fp_pretrain.weight_decay, "bn_reestimate_batches": 0,
        })
        print(f"pretraining the shared FP checkpoint for {target.arch} ({fp_cfg.epochs} epochs, once per campaign)")
        task = ray.remote(_pretrain_fp).options(num_cpus=campaign.resources.cpu, num_gpus=campaign.resources.gpu)
        state, top1 = ray.get(task.remote(fp_cfg.model_dump(mode="json")))  # {"val_top1", "test_top1"}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path)
        path.with_suffix(".json").write_text(json.dumps(top1))  # the reports' FP reference line
        print(f"FP checkpoint for {target.arch}: val_top1 {top1['val_top1']:.4f} -> {path}")
    return str(path), torch.load(path, map_location="cpu", weights_only=True)


def _pretrain_fp(cfg_dict: dict) -> tuple[dict, dict]:

    from oscqat.config import TrainConfig
    from oscqat.trainer import Trainer

    from search.trainable import _set_threads

    _set_threads()
    trainer = Trainer(TrainConfig.model_validate(cfg_dict))
    history = trainer.fit()
    return {k: v.cpu() for k, v in trainer.model.state_dict().items()}, {
        k: history[-1][k] for k in ("val_top1", "test_top1") if history[-1].get(k) is not None}


def _trainable(campaign: Campaign, base_config: dict, fp_state: dict):
    from search.trainable import train_trial
    from search.tuners import with_trial_resources

    return with_trial_resources(campaign, train_trial, base_config=base_config, fp_state=fp_state)


# one target ------------------------------------------------------------------------
def _run_target(campaign: Campaign, target: Target, space, campaign_dir: Path, experiment_id: str,
                state: dict, resume: bool) -> None:
    """Search the target, then confirm its top-k (unless ``confirm: null``), then summarise.

    ``state.json`` records the phase (``running`` -> ``searched`` -> ``confirming`` -> ``done``), so a
    resumed campaign continues the phase it was in and never repeats a finished one.
    """
    from search.tracking import client_for, describe_parent, ensure_parent_run

    tstate = state["targets"].setdefault(target.label, {})
    phase = tstate.get("status") if tstate.get("status") in ("searched", "confirming") else "running"
    exp_path = f"{campaign.ray_storage_path()}/{target.slug}"
    study_name = campaign.study_name(target)
    fp_path, fp_state = _fp_checkpoint(campaign, target, campaign_dir)
    base_config = campaign.trial_config(target, {}, fp_path)  # what every trial shares
    client = client_for(campaign.mlflow.tracking_uri)
    parent_id = ensure_parent_run(client, experiment_id, campaign.name, target, {
        "oscqat.ray_experiment_path": exp_path, "oscqat.optuna_study": study_name,
        "oscqat.optuna_storage": redact(campaign.optuna_storage), "oscqat.space": space.name,
        "oscqat.fp_checkpoint": fp_path, "oscqat.stage": "search",
    }, base_params={k: v for k, v in base_config.items() if k not in space.params})
    describe_parent(client, experiment_id, parent_id, campaign, target, space)
    tstate.update(parent_run_id=parent_id, study_name=study_name, experiment_path=exp_path,
                  experiment_id=experiment_id, status=phase, fp_checkpoint=fp_path)
    write_state(campaign_dir, state)
    trainable = _trainable(campaign, base_config, fp_state)
    if phase == "running":
        _search_target(campaign, target, space, trainable, exp_path, study_name, experiment_id, parent_id,
                       base_config, resume)
        tstate["status"] = "searched"
        write_state(campaign_dir, state)
    if campaign.confirm is not None:
        from search.confirm import run_confirm

        def save_phase(**fields) -> None:
            tstate.update(fields)
            write_state(campaign_dir, state)

        run_confirm(campaign, target, space, tstate, save_phase, base_config=base_config, fp_state=fp_state,
                    experiment_id=experiment_id, parent_id=parent_id, resume=resume)
    summarise_parent(campaign, target, client, parent_id, tstate)
    describe_parent(client, experiment_id, parent_id, campaign, target, space,
                    target_result(campaign, target, tstate))
    tstate["status"] = "done"
    write_state(campaign_dir, state)


def _search_target(campaign: Campaign, target: Target, space, trainable, exp_path: str, study_name: str,
                   experiment_id: str, parent_id: str, base_config: dict, resume: bool) -> None:
    """The search phase: Optuna (TPE or random) proposes, ASHA stops early, Tune runs the trials."""
    from ray import tune

    from search import signals
    from search.rungs import check_campaign_rungs, describe_rungs
    from search.searcher import build_searcher, fail_orphaned_trials
    from search.tracking import MlflowTrialCallback
    from search.tuners import build_search_tuner

    b = campaign.budget
    grace, latest_start = check_campaign_rungs(campaign, {target.label: space})[target.label]
    if resume and tune.Tuner.can_restore(exp_path):
        print(f"resuming {target.label} from {exp_path}")
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        if resume:  # the driver died before Tune saved anything: start over, without the dead run's trials
            stale = fail_orphaned_trials(campaign.optuna_storage, study_name, set(), include_waiting=True)
            if stale:
                log.warning("%d Optuna trial(s) of %s left by the stopped driver were marked FAIL", stale, study_name)
        points = space.starting_points if b.enqueue_starting_points else []
        names = space.starting_point_names if b.enqueue_starting_points else []
        searcher = build_searcher(space.define_by_run, points, names, study_name, campaign.optuna_storage,
                                  campaign.seed, b.max_epochs, sampler=b.searcher, startup_trials=b.startup_trials(len(points)),
                                  study_attrs={"campaign": campaign.name, "target": target.label,
                                               "mlflow_experiment_id": experiment_id, "mlflow_parent_run_id": parent_id})
        callback = MlflowTrialCallback(campaign.mlflow.tracking_uri, experiment_id, parent_id, campaign.name,
                                       target.label, base_config, b.max_epochs, study_name)
        tuner = build_search_tuner(campaign, target, trainable, searcher, grace, callback)
    rungs = (describe_rungs(grace, b.reduction_factor, b.max_epochs, latest_start) if b.scheduler == "asha"
             else "no early stopping (fifo)")
    startup = ""
    if b.searcher == "tpe":
        n_points = len(space.starting_points) if b.enqueue_starting_points else 0
        startup = f"; TPE models after {b.startup_trials(n_points)} start-up trials"
    print(f"searching {target.label}: {b.num_samples} trials, up to {b.max_epochs} epochs each; {rungs}{startup}")
    tuner.fit()
    signals.raise_if_interrupted()  # Tune returns normally on a stop: nothing below may treat it as done
    orphans = fail_orphaned_trials(campaign.optuna_storage, study_name, set())
    if orphans:
        log.warning("%d Optuna trial(s) left RUNNING by a stopped driver were marked FAIL", orphans)


# campaigns ---------------------------------------------------------------------------
def run_campaign(campaign: Campaign, address: str | None = None) -> list[TargetResult]:
    """Start a new campaign. Refuses to overwrite an existing one (use resume).

    Everything that can be checked is checked before anything is written: the campaign, its
    files (``preflight``), the lock (one driver per campaign), Ray's resources, the backends.
    """
    from search import preflight

    campaign_dir = campaign.campaign_dir()
    if (campaign_dir / CAMPAIGN_FILE).exists():
        with _locked(campaign_dir, campaign.name):  # a live driver: say so rather than "already exists"
            _refuse_existing(campaign, campaign_dir)
    campaign = _absolute_stores(campaign)
    spaces = _resolve_spaces(campaign)
    _check_rungs(campaign, spaces)
    preflight.check_before_writing(campaign)
    if not (address or campaign.ray_address):  # the local Ray to be started: known without starting it
        preflight.check_resources(campaign, preflight.local_resources())
    created = next((p for p in reversed((campaign_dir, *campaign_dir.parents)) if not p.exists()), None)
    written = False
    try:
        with _locked(campaign_dir, campaign.name):
            _refuse_existing(campaign, campaign_dir)  # another driver may have finished meanwhile
            _check_studies_unused(campaign)
            experiment_id = check_backends(campaign)  # before Ray: a dead backend fails in seconds
            init_ray(address or campaign.ray_address)
            preflight.check_resources(campaign, _cluster_resources())
            (campaign_dir / CAMPAIGN_FILE).write_text(yaml.safe_dump(campaign.model_dump(mode="json"), sort_keys=False))
            written = True
            state = {"targets": {}, "address": address, "stores": _store_identities(campaign)}
            write_state(campaign_dir, state)
            return _run_targets(campaign, spaces, campaign_dir, experiment_id, state,
                                address or campaign.ray_address, False)
    finally:
        if created is not None and not written:  # refused before it began: leave nothing half-made behind
            import shutil

            shutil.rmtree(created, ignore_errors=True)


def resume_campaign(name_or_path: str, address: str | None = None) -> list[TargetResult]:
    from search import preflight
    from search.store_watch import check_stores

    campaign_dir = locate_campaign(name_or_path)
    with _locked(campaign_dir, campaign_dir.name):
        campaign = load_campaign(campaign_dir / CAMPAIGN_FILE)
        spaces = _resolve_spaces(campaign)
        preflight.check_before_writing(campaign)
        state = read_state(campaign_dir)
        check_stores(state.get("stores", {}))  # a deleted/replaced store: stop before Optuna makes a new one
        experiment_id = check_backends(campaign)
        init_ray(address or campaign.ray_address)
        preflight.check_resources(campaign, _cluster_resources())
        results = _run_targets(campaign, spaces, campaign_dir, experiment_id, state,
                               address or campaign.ray_address, True)
    _hint_sync(campaign, state)
    return results


def mlflow_missing_epochs(campaign: Campaign, tstate: dict, max_trials: int = 2000) -> int:
    """Epochs Ray recorded (``result.json``) that the target's MLflow child runs lack. A driver killed
    while MLflow was down loses its buffered writes, and Tune does not send old results again."""
    from search.tracking import client_for, find_child_runs

    exp_path = Path(str(tstate.get("experiment_path", "")))
    if not tstate.get("parent_run_id") or "://" in str(exp_path) or not exp_path.is_dir():
        return 0
    client = client_for(campaign.mlflow.tracking_uri)
    runs = find_child_runs(client, tstate["experiment_id"], tstate["parent_run_id"])
    missing = 0
    for tdir in sorted(p for p in exp_path.iterdir() if (p / "result.json").is_file())[:max_trials]:
        epochs, tid = set(), None
        for line in (tdir / "result.json").read_text(errors="replace").splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            tid = tid or r.get("trial_id")
            if not r.get("failure_reason") and int(r.get("epoch", 0)) > 0:
                epochs.add(int(r["epoch"]))
        run = runs.get(tid)
        logged = {m.step for m in client.get_metric_history(run.info.run_id, "val_top1")} if run else set()
        missing += len(epochs - logged)
    return missing


def _hint_sync(campaign: Campaign, state: dict) -> None:
    try:
        missing = sum(mlflow_missing_epochs(campaign, t) for t in state.get("targets", {}).values())
    except Exception as exc:  # noqa: BLE001 - a hint only
        log.debug("could not compare MLflow with Ray's results: %s", exc)
        return
    if missing:
        print(f"MLflow lacks {missing} epoch(s) that Ray recorded (a previous driver stopped with MLflow writes "
              f"buffered); run `oscqat report sync {campaign.name}` to add them")


def _refuse_existing(campaign: Campaign, campaign_dir: Path) -> None:
    if (campaign_dir / CAMPAIGN_FILE).exists():
        raise CampaignError(f"campaign {campaign.name!r} already exists in {campaign_dir}; "
                            f"continue it with `oscqat search resume {campaign.name}` or pick a new name")


def _locked(campaign_dir: Path, name: str):
    from search.lock import CampaignLock, CampaignLocked

    lock = CampaignLock(campaign_dir, name)
    try:
        lock.acquire()
    except CampaignLocked as exc:
        raise CampaignError(str(exc)) from None
    if lock.stale and lock.stale.get("pid"):
        log.warning("campaign %s: the lock of driver pid %s (%s) was stale (that driver is gone); taking it over",
                    name, lock.stale.get("pid"), lock.stale.get("host", "?"))
    import contextlib

    @contextlib.contextmanager
    def held():
        try:
            yield lock
        finally:
            lock.release()
    return held()


def _cluster_resources() -> dict[str, float]:
    import ray

    return {k: float(v) for k, v in ray.cluster_resources().items()}


def _store_identities(campaign: Campaign) -> dict:
    from search.store_watch import identity

    return {uri: identity(uri) for uri in (campaign.optuna_storage, campaign.mlflow.tracking_uri)}


def _absolute_stores(campaign: Campaign) -> Campaign:
    """Pin relative sqlite URIs to the launch directory, so resume/status/report work from anywhere."""
    # Credentials stay in this process (uris.remember): campaign.yaml, state.json, MLflow tags and
    # Tune's pickles only ever see the masked URI; resume takes them from the environment.
    mlflow = campaign.mlflow.model_copy(
        update={"tracking_uri": uris.remember(uris.absolute(campaign.mlflow.tracking_uri))})
    return campaign.model_copy(update={"mlflow": mlflow,
                                       "optuna_storage": uris.remember(uris.absolute(campaign.optuna_storage))})


def _check_studies_unused(campaign: Campaign) -> None:
    """Re-using a study name would append to it: refuse instead."""
    import optuna

    from search.searcher import make_storage

    if not uris.store_exists(campaign.optuna_storage):
        return  # a new file store holds no study (and must not be created before the checks pass)
    try:
        existing = set(optuna.get_all_study_names(make_storage(campaign.optuna_storage)))
    except Exception:  # noqa: BLE001 - reported by check_backends with a better message
        return
    clash = [campaign.study_name(t) for t in campaign.targets if campaign.study_name(t) in existing]
    if clash:
        raise CampaignError(f"Optuna study {clash[0]!r} already exists in {redact(campaign.optuna_storage)}; "
                            f"rename the campaign or resume it")


def _run_targets(campaign, spaces, campaign_dir, experiment_id, state, address, resume) -> list[TargetResult]:
    """The targets in order. A stop signal or a changed store ends the whole campaign, leaving the
    interrupted target ``running`` (resume restores it from Tune's snapshot), never ``done``."""
    from search import signals
    from search.store_watch import StoreChanged, StoreWatcher, check_stores

    stores = state.get("stores") or {}
    results = []
    with signals.stop_on_signals(), StoreWatcher(stores):
        try:
            init_ray(address)
            for target in campaign.targets:
                signals.raise_if_interrupted()
                check_stores(stores)
                tstate = state["targets"].get(target.label, {})
                if tstate.get("status") == "done":
                    print(f"{target.label}: already finished")
                else:
                    resuming = resume and tstate.get("status") in ACTIVE_PHASES
                    if resuming:
                        _reopen_interrupted(campaign, tstate)
                    try:
                        _run_target(campaign, target, spaces[target.label], campaign_dir, experiment_id, state,
                                    resume=resuming)
                    finally:
                        signals.reset_tune_handler()
                results.append(target_result(campaign, target, state["targets"].get(target.label)))
            if state.pop("interrupted", None) is not None:
                write_state(campaign_dir, state)
        except (signals.CampaignInterrupted, KeyboardInterrupt, StoreChanged) as exc:
            _mark_interrupted(campaign, campaign_dir, state, exc)
            if isinstance(exc, StoreChanged):
                raise CampaignError(str(exc)) from None
            raise signals.CampaignInterrupted(signals.interrupted() or 2) from None
        except (CampaignError, ConfigError):
            raise
        except Exception as exc:  # noqa: BLE001 - a backend or the disk failed under the campaign
            # (a full disk under storage_path, the Optuna storage read-only/locked/unreachable): stop
            # with one clear line, leave the target resumable and its runs marked, no traceback
            why = f"{exc.__class__.__name__}: {redact(str(exc)).splitlines()[0][:300] if str(exc) else ''}"
            log.debug("campaign stopped", exc_info=True)
            _mark_interrupted(campaign, campaign_dir, state, RuntimeError(f"stopped by an error: {why}"))
            raise CampaignError(f"campaign {campaign.name!r} stopped: {why}. Nothing was marked done that is "
                                f"not; fix the cause (disk space, store access) and run "
                                f"`oscqat search resume {campaign.name}`") from None
    return results


INTERRUPTED_TAG = "oscqat.interrupted"


def _mark_interrupted(campaign: Campaign, campaign_dir: Path, state: dict, exc: BaseException) -> None:
    """Leave the campaign resumable and say so: targets stay ``running``; their parent run and
    still-RUNNING child runs become KILLED with ``oscqat.interrupted`` (resume reopens them)."""
    from search.tracking import client_for

    reason = (str(exc) or exc.__class__.__name__)[:500]
    state["interrupted"] = reason
    try:
        write_state(campaign_dir, state)
    except OSError as exc2:  # the disk may be the fault; state.json still says `running`
        log.warning("could not record the stop in %s: %s", STATE_FILE, exc2)
    try:
        client = client_for(campaign.mlflow.tracking_uri)
        for tstate in state["targets"].values():
            parent = tstate.get("parent_run_id")
            if tstate.get("status") not in ACTIVE_PHASES or not parent:
                continue
            children = client.search_runs([tstate["experiment_id"]], max_results=50_000,
                                          filter_string=f"tags.`mlflow.parentRunId` = '{parent}' and "
                                                        f"attributes.status = 'RUNNING'")
            for run_id in [r.info.run_id for r in children] + [parent]:
                client.set_tag(run_id, INTERRUPTED_TAG, reason)
                client.set_terminated(run_id, "KILLED")
    except Exception as exc2:  # noqa: BLE001 - the state file alone is enough to resume
        log.warning("could not mark the interrupted runs in MLflow: %s", redact(str(exc2)).splitlines()[0][:300])


def _reopen_interrupted(campaign: Campaign, tstate: dict) -> None:
    """Resume: the child runs an interrupt marked KILLED are live again (their trials go on)."""
    from search.tracking import client_for

    parent = tstate.get("parent_run_id")
    if not parent:
        return
    try:
        client = client_for(campaign.mlflow.tracking_uri)
        runs = client.search_runs([tstate["experiment_id"]], max_results=50_000,
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent}' and "
                                                f"tags.`{INTERRUPTED_TAG}` != ''")
        for r in runs:
            client.delete_tag(r.info.run_id, INTERRUPTED_TAG)
            client.update_run(r.info.run_id, status="RUNNING")
        parent_run = client.get_run(parent)
        if INTERRUPTED_TAG in parent_run.data.tags:
            client.delete_tag(parent, INTERRUPTED_TAG)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not reopen the interrupted runs in MLflow: %s", redact(str(exc)).splitlines()[0][:300])
