"""Run and resume campaigns: one Optuna study + ASHA + Tuner per target, MLflow from the driver.

Layout under ``storage_path/<campaign>/``: ``campaign.yaml`` (the validated campaign),
``state.json`` (per-target progress, parent run ids, study names), ``fp/<arch>.pt`` (the
shared FP checkpoints) and one Ray Tune experiment folder per target.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from search.campaign import Campaign, Target, load_campaign
from search.searcher import redact

log = logging.getLogger(__name__)
STATE_FILE = "state.json"
CAMPAIGN_FILE = "campaign.yaml"


class CampaignError(RuntimeError):
    """A campaign cannot start or continue; the message says why and what to do."""


@dataclass
class TargetResult:
    target: str
    best_trial_id: str | None
    best_val_top1: float | None
    method: str | None
    params: dict
    counts: dict


# state ---------------------------------------------------------------------------
def read_state(campaign_dir: Path) -> dict:
    path = campaign_dir / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {"targets": {}}


def write_state(campaign_dir: Path, state: dict) -> None:
    tmp = campaign_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(campaign_dir / STATE_FILE)


def locate_campaign(name_or_path: str, storage_path: str = "./ray_results") -> Path:
    """A campaign directory from its name (under storage_path), its directory, or its YAML file."""
    p = Path(name_or_path).expanduser()
    candidates = [p, Path(storage_path).expanduser() / name_or_path]
    if p.suffix in (".yaml", ".yml") and p.is_file():
        try:
            camp = load_campaign(p)
            candidates.insert(0, camp.campaign_dir())
        except Exception:  # noqa: BLE001 - fall through to the other candidates
            pass
    for c in candidates:
        if (c / CAMPAIGN_FILE).is_file():
            return c.resolve()
    raise CampaignError(f"no campaign found for {name_or_path!r} (looked in: {', '.join(str(c) for c in candidates)})")


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


def _resolve_spaces(campaign: Campaign) -> dict:
    from spaces import load_space

    return {t.label: load_space(campaign.space_for(t), t.bits) for t in campaign.targets}


# Ray -----------------------------------------------------------------------------
def init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    kwargs = dict(include_dashboard=False, log_to_driver=True, configure_logging=True, logging_level=logging.WARNING)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(**kwargs)


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
                                                                "batch_size", "num_workers", "device")},
            "arch": target.arch, "bits": "fp32", "dataset": campaign.dataset, "seed": campaign.seed,
            "epochs": campaign.fp_pretrain.epochs, "lr": campaign.fp_pretrain.lr,
            "weight_decay": campaign.fp_pretrain.weight_decay, "bn_reestimate_batches": 0,
        })
        print(f"pretraining the shared FP checkpoint for {target.arch} ({fp_cfg.epochs} epochs, once per campaign)")
        task = ray.remote(_pretrain_fp).options(num_cpus=campaign.resources.cpu, num_gpus=campaign.resources.gpu)
        state, top1 = ray.get(task.remote(fp_cfg.model_dump(mode="json")))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path)
        path.with_suffix(".json").write_text(json.dumps({"val_top1": top1}))  # the reports' FP reference line
        print(f"FP checkpoint for {target.arch}: val_top1 {top1:.4f} -> {path}")
    return str(path), torch.load(path, map_location="cpu", weights_only=True)


def _pretrain_fp(cfg_dict: dict) -> tuple[dict, float]:
    import torch

    from oscqat.config import TrainConfig
    from oscqat.trainer import Trainer

    from search.trainable import _set_threads

    _set_threads()
    trainer = Trainer(TrainConfig.model_validate(cfg_dict))
    history = trainer.fit()
    return {k: v.cpu() for k, v in trainer.model.state_dict().items()}, history[-1]["val_top1"]


def _base_config(campaign: Campaign, target: Target, fp_path: str) -> dict:
    """The fixed part of every trial's TrainConfig (validated once here)."""
    base = dict(campaign.base)
    if base.get("data_dir") and "://" not in str(base["data_dir"]):  # a URI is not a local path
        base["data_dir"] = str(Path(base["data_dir"]).expanduser().resolve())
    cfg = campaign.train_config(target, {}).model_dump(mode="json")
    cfg.update({k: v for k, v in base.items()})
    cfg["pretrained"] = fp_path
    return cfg


def _trainable(campaign: Campaign, base_config: dict, fp_state: dict):
    from ray import tune

    from search.trainable import train_trial

    fn = tune.with_parameters(train_trial, base_config={**base_config, "pretrained": None}, fp_state=fp_state,
                              checkpoint_interval_s=campaign.checkpoint_interval_s)
    return tune.with_resources(fn, {"cpu": campaign.resources.cpu, "gpu": campaign.resources.gpu})


# one target ------------------------------------------------------------------------
def _run_target(campaign: Campaign, target: Target, space, campaign_dir: Path, experiment_id: str,
                state: dict, resume: bool) -> None:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from search.searcher import build_searcher, fail_orphaned_trials
    from search.progress import progress_callbacks, tune_verbosity
    from search.tracking import MlflowTrialCallback, client_for, describe_parent, ensure_parent_run
    from search.trial_memory import TrimFinishedTrials

    tstate = state["targets"].setdefault(target.label, {})
    exp_path = f"{campaign.ray_storage_path()}/{target.slug}"
    study_name = campaign.study_name(target)
    fp_path, fp_state = _fp_checkpoint(campaign, target, campaign_dir)
    base_config = _base_config(campaign, target, fp_path)
    client = client_for(campaign.mlflow.tracking_uri)
    parent_id = ensure_parent_run(client, experiment_id, campaign.name, target, {
        "oscqat.ray_experiment_path": exp_path, "oscqat.optuna_study": study_name,
        "oscqat.optuna_storage": redact(campaign.optuna_storage), "oscqat.space": space.name,
        "oscqat.fp_checkpoint": fp_path,
    }, base_params={k: v for k, v in base_config.items() if k not in space.params})
    describe_parent(client, experiment_id, parent_id, campaign, target, space)
    tstate.update(parent_run_id=parent_id, study_name=study_name, experiment_path=exp_path,
                  experiment_id=experiment_id, status="running", fp_checkpoint=fp_path)
    write_state(campaign_dir, state)
    trainable = _trainable(campaign, base_config, fp_state)

    if resume and tune.Tuner.can_restore(exp_path):
        print(f"resuming {target.label} from {exp_path}")
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        if resume:  # the driver died before Tune saved anything: start over, without the dead run's trials
            stale = fail_orphaned_trials(campaign.optuna_storage, study_name, set(), include_waiting=True)
            if stale:
                log.warning("%d Optuna trial(s) of %s left by the stopped driver were marked FAIL", stale, study_name)
        b = campaign.budget
        points = space.starting_points if b.enqueue_starting_points else []
        names = space.starting_point_names if b.enqueue_starting_points else []
        searcher = build_searcher(space.define_by_run, points, names, study_name, campaign.optuna_storage,
                                  campaign.seed, b.max_epochs, sampler=b.searcher,
                                  study_attrs={"campaign": campaign.name, "target": target.label,
                                               "mlflow_experiment_id": experiment_id, "mlflow_parent_run_id": parent_id})
        if b.scheduler == "asha":
            scheduler = ASHAScheduler(time_attr="training_iteration", max_t=b.max_epochs,
                                      grace_period=b.grace_period, reduction_factor=b.reduction_factor)
        else:
            from ray.tune.schedulers import FIFOScheduler

            scheduler = FIFOScheduler()
        callback = MlflowTrialCallback(campaign.mlflow.tracking_uri, experiment_id, parent_id, campaign.name,
                                       target.label, base_config, b.max_epochs, study_name)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(metric="val_top1", mode="max", search_alg=searcher, scheduler=scheduler,
                                        num_samples=b.num_samples, max_concurrent_trials=campaign.max_concurrent_trials,
                                        time_budget_s=b.time_budget_s,
                                        # a new trial reuses a finished trial's worker process: no new
                                        # process, torch import and data set build per trial
                                        reuse_actors=True),
            run_config=tune.RunConfig(
                name=target.slug, storage_path=campaign.ray_storage_path(),
                # the trimmer last: after MLflow read the trial; the compact progress line unless --verbose
                callbacks=[callback, *progress_callbacks(target.label, b.num_samples, b.max_epochs), TrimFinishedTrials()],
                failure_config=tune.FailureConfig(max_failures=campaign.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=campaign.checkpoints_to_keep),
                verbose=tune_verbosity(),
            ),
        )
    print(f"searching {target.label}: {campaign.budget.num_samples} trials, up to {campaign.budget.max_epochs} epochs "
          f"each (ASHA grace {campaign.budget.grace_period}, factor {campaign.budget.reduction_factor:g})")
    tuner.fit()
    orphans = fail_orphaned_trials(campaign.optuna_storage, study_name, set())
    if orphans:
        log.warning("%d Optuna trial(s) left RUNNING by a stopped driver were marked FAIL", orphans)
    _summarise_parent(campaign, target, client, parent_id, base_config)
    describe_parent(client, experiment_id, parent_id, campaign, target, space, target_result(campaign, target))
    tstate["status"] = "done"
    write_state(campaign_dir, state)


def target_result(campaign: Campaign, target: Target) -> TargetResult:
    """Best COMPLETE trial of the target's study, and trial counts by state."""
    import optuna

    from search.searcher import TRIAL_ID_ATTR, make_storage, storage_exists

    if not storage_exists(campaign.optuna_storage):  # read-only: never create the database
        return TargetResult(target.label, None, None, None, {}, {})
    try:
        study = optuna.load_study(study_name=campaign.study_name(target), storage=make_storage(campaign.optuna_storage))
    except KeyError:
        return TargetResult(target.label, None, None, None, {}, {})
    trials = study.get_trials(deepcopy=False)
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    complete = [t for t in trials if t.state.name == "COMPLETE" and t.value is not None]
    if not complete:
        return TargetResult(target.label, None, None, None, {}, counts)
    best = max(complete, key=lambda t: t.value)
    return TargetResult(target.label, best.user_attrs.get(TRIAL_ID_ATTR), best.value, best.params.get("method"),
                        dict(best.params), counts)


def _summarise_parent(campaign: Campaign, target: Target, client, parent_id: str, base_config: dict) -> None:
    res = target_result(campaign, target)
    try:
        if res.best_val_top1 is not None:
            client.log_metric(parent_id, "best_val_top1", res.best_val_top1)
            client.set_tag(parent_id, "oscqat.best_trial_id", res.best_trial_id or "")
            client.set_tag(parent_id, "oscqat.best_method", res.method or "")
            client.set_tag(parent_id, "oscqat.best_params", json.dumps(res.params, sort_keys=True)[:4000])
        for state_name, n in res.counts.items():
            client.log_metric(parent_id, f"trials_{state_name.lower()}", n)
        client.set_terminated(parent_id, "FINISHED")
    except Exception as exc:  # noqa: BLE001
        log.warning("could not write the summary of %s to MLflow: %s", target.label, exc)


# campaigns ---------------------------------------------------------------------------
def run_campaign(campaign: Campaign, address: str | None = None) -> list[TargetResult]:
    """Start a new campaign. Refuses to overwrite an existing one (use resume)."""
    campaign_dir = campaign.campaign_dir()
    if (campaign_dir / CAMPAIGN_FILE).exists():
        raise CampaignError(f"campaign {campaign.name!r} already exists in {campaign_dir}; "
                            f"continue it with `oscqat search resume {campaign.name}` or pick a new name")
    campaign = _absolute_stores(campaign)
    spaces = _resolve_spaces(campaign)
    _check_studies_unused(campaign)
    experiment_id = check_backends(campaign)
    campaign_dir.mkdir(parents=True, exist_ok=True)
    (campaign_dir / CAMPAIGN_FILE).write_text(yaml.safe_dump(campaign.model_dump(mode="json"), sort_keys=False))
    state = {"targets": {}, "address": address}
    write_state(campaign_dir, state)
    return _run_targets(campaign, spaces, campaign_dir, experiment_id, state, address or campaign.ray_address, False)


def resume_campaign(name_or_path: str, address: str | None = None) -> list[TargetResult]:
    campaign_dir = locate_campaign(name_or_path)
    campaign = load_campaign(campaign_dir / CAMPAIGN_FILE)
    spaces = _resolve_spaces(campaign)
    experiment_id = check_backends(campaign)
    state = read_state(campaign_dir)
    return _run_targets(campaign, spaces, campaign_dir, experiment_id, state, address or campaign.ray_address, True)


def _absolute_sqlite(uri: str) -> str:
    """``sqlite:///rel.db`` or ``journal:///rel.log`` -> the same file by its absolute path."""
    for scheme in ("sqlite:///", "journal:///"):
        if uri.startswith(scheme) and not uri.startswith(scheme + "/"):
            return scheme + str(Path(uri.removeprefix(scheme)).expanduser().resolve())
    return uri


def _absolute_stores(campaign: Campaign) -> Campaign:
    """Pin relative sqlite URIs to the launch directory, so resume/status/report work from anywhere."""
    mlflow = campaign.mlflow.model_copy(update={"tracking_uri": _absolute_sqlite(campaign.mlflow.tracking_uri)})
    return campaign.model_copy(update={"mlflow": mlflow, "optuna_storage": _absolute_sqlite(campaign.optuna_storage)})


def _check_studies_unused(campaign: Campaign) -> None:
    """Re-using a study name would append to it: refuse instead."""
    import optuna

    from search.searcher import make_storage

    try:
        existing = set(optuna.get_all_study_names(make_storage(campaign.optuna_storage)))
    except Exception:  # noqa: BLE001 - reported by check_backends with a better message
        return
    clash = [campaign.study_name(t) for t in campaign.targets if campaign.study_name(t) in existing]
    if clash:
        raise CampaignError(f"Optuna study {clash[0]!r} already exists in {redact(campaign.optuna_storage)}; "
                            f"rename the campaign or resume it")


def _run_targets(campaign, spaces, campaign_dir, experiment_id, state, address, resume) -> list[TargetResult]:
    init_ray(address)
    results = []
    for target in campaign.targets:
        tstate = state["targets"].get(target.label, {})
        if tstate.get("status") == "done":
            print(f"{target.label}: already finished")
        else:
            _run_target(campaign, target, spaces[target.label], campaign_dir, experiment_id, state,
                        resume=resume and tstate.get("status") == "running")
        results.append(target_result(campaign, target))
    return results
