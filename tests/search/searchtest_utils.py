"""Shared helpers for the search-layer tests: tiny campaigns, CLI subprocesses, record checks.

Every campaign here is sized for a 2-core machine shared with other engineers: the demo net on
scikit-learn's digits, batch 128, 2 BN re-estimation batches, 1-3 epochs, 1-3 trials of 1 CPU.

The test space (``write_space``) enqueues good starting points and then one that collapses the
weights (lr 0.5, weight decay 1.0: ~10-20% top-1 against 70-93% after one epoch). The collapse point
starts only after a good trial has passed ASHA's first rung (the good ones run first: side by side on
two CPUs, or one after the other with max_concurrent_trials 1), so it is always stopped there:
pruning is guaranteed, not left to chance.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from proc_utils import kill_pids, pids_using  # noqa: F401 - re-exported

import yaml

START_POINTS = {  # name -> values; "collapse" ends at ~10-20% top-1, the good ones at ~70-90% after 1 epoch
    "good-lsq": {"method": "lsq", "lr": 0.03, "weight_decay": 5e-5, "quantizer_lr": 1e-5},
    "good-dampen": {"method": "dampen", "lr": 0.03, "weight_decay": 5e-5, "quantizer_lr": 1e-5, "dampen_lambda": 0.1},
    "collapse": {"method": "lsq", "lr": 0.5, "weight_decay": 1.0, "quantizer_lr": 1e-5},
    # Adam at 0.05 takes the 8-bit classifier scales across 0 at the first step: QuantizerCollapseError
    "scale-collapse": {"method": "lsq", "lr": 0.03, "weight_decay": 5e-5, "quantizer_lr": 0.05},
}
SPACE_PARAMS = {
    "lr": {"type": "float", "low": 0.01, "high": 0.5, "log": True},
    "weight_decay": {"type": "float", "low": 1e-5, "high": 1.0, "log": True},
    "quantizer_lr": {"type": "float", "low": 1e-6, "high": 1e-4, "log": True},
    "method": {"type": "categorical", "choices": ["lsq", "dampen"]},
    "dampen_lambda": {"type": "float", "low": 0.01, "high": 1.0, "log": True, "when": {"method": ["dampen"]}},
}
TINY_BASE = {"bn_reestimate_batches": 2, "batch_size": 128}
PER_EPOCH_METRICS = ("val_top1", "train_loss", "val_loss", "lr", "osc_frac")
# a pruned trial is no failure: FINISHED, told apart by oscqat.pruned (KILLED: stopped by a person)
MLFLOW_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "FINISHED", "FAIL": "FAILED"}


# campaign files ----------------------------------------------------------------------------
def write_space(directory: Path, points=("good-lsq", "good-dampen", "collapse")) -> Path:
    """A space file for the demo net whose starting points (w4a4 and w3a3) are ``points``, in order."""
    section = {"starting_points": [{"name": name, **START_POINTS[name]} for name in points]}
    data = {"name": "tiny_test", "arch": "demo_net", "description": "search-layer test space",
            "params": SPACE_PARAMS, "bits": {"w4a4": section, "w3a3": section}}
    path = directory / "tiny_space.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def campaign_dict(name: str, space: Path, *, bits=("w4a4",), num_samples: int = 4, max_epochs: int = 2,
                  pretrained: Path | None = None, **extra) -> dict:
    targets = [{"arch": "demo_net", "bits": b, **({"pretrained": str(pretrained)} if pretrained else {})}
               for b in bits]
    data = {
        "name": name, "dataset": "digits", "space": str(space), "targets": targets, "base": dict(TINY_BASE),
        # rung at epoch 1 on purpose (pruning is what these tests check): allowed explicitly
        "budget": {"num_samples": num_samples, "max_epochs": max_epochs, "grace_period": 1, "reduction_factor": 2,
                   "allow_early_rungs": True},
        "confirm": None,  # the confirm stage has its own test (test_campaign_confirm.py)
        "resources": {"cpu": 1, "gpu": 0}, "fp_pretrain": {"epochs": 1}, "seed": 0,
        "checkpoint_interval_s": 0,  # a checkpoint every epoch: the restart tests resume mid-trial
    }
    data.update(extra)
    return data


def write_campaign(directory: Path, data: dict, filename: str = "campaign.yaml") -> Path:
    path = directory / filename
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def make_fp_checkpoint(path: Path) -> Path:
    """A float state dict of the demo net for digits (1 channel, 10 classes) to start QAT from.

    Freshly initialised, not trained: the campaigns only need *a* valid FP checkpoint file (the
    CLI end-to-end test covers the campaign's own FP pretraining), and QAT of the good starting
    points still reaches ~70% top-1 after one epoch against ~10% for the collapsing one.
    """
    import torch

    from oscqat.models import create_model

    torch.manual_seed(0)
    torch.save(create_model("demo_net", num_classes=10, in_chans=1).state_dict(), path)
    return path


# processes -----------------------------------------------------------------------------------
def oscqat_cmd() -> list[str]:
    script = Path(sys.executable).with_name("oscqat")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "oscqat_cli"]


def short_ray_tmpdir() -> Path:
    """A private, short RAY_TMPDIR (Unix socket paths must stay under ~107 characters).

    Private so that ``ray.init()`` neither attaches to a cluster somebody else started on this
    machine (``/tmp/ray/ray_current_cluster``) nor hands ours to them.
    """
    return Path(tempfile.mkdtemp(prefix="oqs", dir="/tmp"))


def cli_env(ray_tmp: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "OSCQAT_FAULT_INJECT")}
    env.update(RAY_TMPDIR=str(ray_tmp), COLUMNS="250", PYTHONUNBUFFERED="1", NO_COLOR="1", TERM="dumb",
               RAY_DEDUP_LOGS="0", **extra)
    return env


def start_cli(args: list[str], cwd: Path, env: dict, log_prefix: str) -> tuple[subprocess.Popen, Path, Path]:
    """Start ``oscqat ARGS`` in its own session/process group; stdout/stderr go to files in cwd."""
    out, err = cwd / f"{log_prefix}.out", cwd / f"{log_prefix}.err"
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen(oscqat_cmd() + args, cwd=cwd, env=env, stdout=fo, stderr=fe,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return proc, out, err


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + "\n" + self.stderr


def run_cli(args: list[str], cwd: Path, env: dict, timeout: float, log_prefix: str = "cli") -> CliResult:
    return wait_cli(start_cli(args, cwd, env, log_prefix), timeout)


def wait_cli(started: tuple[subprocess.Popen, Path, Path], timeout: float) -> CliResult:
    proc, out, err = started
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(proc.pid)
        proc.wait(timeout=30)
        raise AssertionError(f"`{' '.join(map(str, proc.args))}` ran past {timeout}s:\n{tail(out)}\n{tail(err)}") from None
    finally:
        kill_session(proc.pid)  # Ray helpers it left behind (same session), if any
    return CliResult(proc.returncode, out.read_text(), err.read_text())


def tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def session_pids(sid: int, alive_only: bool = False) -> list[int]:
    """PIDs of the processes whose session id is ``sid`` (the session a start_cli call created);
    ``alive_only`` leaves out zombies (killed, not yet reaped)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session ...
        if len(fields) > 3 and int(fields[3]) == sid and int(entry.name) != os.getpid():
            if not (alive_only and fields[0] in ("Z", "X")):
                pids.append(int(entry.name))
    return pids


def kill_session(sid: int) -> None:
    """SIGKILL the process group ``sid`` leads and anything else left in its session (by PID)."""
    try:
        os.killpg(sid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    kill_pids(session_pids(sid))


def stop_ray_leftovers(ray_tmp: Path) -> None:
    """Kill (by PID) Ray processes still running from our private RAY_TMPDIR, then remove it."""
    for _ in range(5):
        pids = pids_using(str(ray_tmp))
        if pids:
            kill_pids(pids)
            time.sleep(0.5)
            continue
        shutil.rmtree(ray_tmp, ignore_errors=True)  # a dying process may still add a log file: retry
        if not ray_tmp.exists():
            return
        time.sleep(1.0)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# reading results back ------------------------------------------------------------------------
@dataclass
class TargetRecords:
    label: str
    parent: object
    children: dict  # tune trial id -> mlflow Run
    trials: dict  # tune trial id -> optuna FrozenTrial
    histories: dict = field(default_factory=dict)  # tune trial id -> {metric: [(step, value)]}

    def epochs(self, tid: str) -> int:
        return len(self.histories[tid]["val_top1"])

    def by_state(self, state: str) -> list[str]:
        return [tid for tid, t in self.trials.items() if t.state.name == state]


def check_records(tracking_uri: str, experiment: str, optuna_url: str, campaign: str, study_names: dict,
                  max_epochs: int, num_samples: int, exact_values: bool = True,
                  orphans: dict | None = None) -> dict[str, TargetRecords]:
    """Assert MLflow and Optuna agree for a finished campaign; return them per target label.

    ``study_names``: target label -> Optuna study name. ``exact_values``: also require MLflow's
    per-epoch val_top1 to equal Optuna's intermediate values (not after a driver kill, where an
    epoch may be re-trained from an older checkpoint and only the first value of each is kept).
    ``orphans``: target label -> how many Optuna trials a killed driver left that Tune never ran
    (marked FAIL, reason "orphaned"); they have no MLflow run and are left out of the other checks.
    """
    import optuna
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r} in {tracking_uri}"
    runs = client.search_runs([exp.experiment_id], max_results=10_000)
    parents = [r for r in runs if r.data.tags.get("oscqat.role") == "parent"]
    trial_runs = [r for r in runs if r.data.tags.get("oscqat.role") == "trial"
                  and r.data.tags.get("oscqat.stage", "search") == "search"]
    confirm_runs = [r for r in runs if r.data.tags.get("oscqat.stage") == "confirm"]
    assert len(runs) == len(parents) + len(trial_runs) + len(confirm_runs), "runs that are neither a parent nor a trial"
    parent_targets = Counter(r.data.tags.get("oscqat.target") for r in parents)
    assert parent_targets == Counter(set(study_names)), f"one parent per target expected, got {parent_targets}"
    parent_ids = {r.info.run_id for r in parents}
    unparented = [r.info.run_id for r in trial_runs if r.data.tags.get("mlflow.parentRunId") not in parent_ids]
    assert not unparented, f"trial runs without a parent: {unparented}"

    storage = optuna.storages.RDBStorage(optuna_url)
    out = {}
    for parent in parents:
        label = parent.data.tags["oscqat.target"]
        assert parent.data.tags.get("oscqat.campaign") == campaign
        assert parent.info.status == "FINISHED", f"parent of {label} is {parent.info.status}"
        kids = [r for r in trial_runs if r.data.tags["mlflow.parentRunId"] == parent.info.run_id]
        kid_ids = Counter(r.data.tags.get("oscqat.trial_id") for r in kids)
        dupes = {k: n for k, n in kid_ids.items() if n > 1}
        assert not dupes, f"{label}: duplicated MLflow child runs per Tune trial id: {dupes}"
        children = {r.data.tags["oscqat.trial_id"]: r for r in kids}

        study = optuna.load_study(study_name=study_names[label], storage=storage)
        trials = study.get_trials(deepcopy=False)
        states = Counter(t.state.name for t in trials)
        orphaned = [t for t in trials if t.state.name == "FAIL"
                    and str(t.user_attrs.get("failure_reason", "")).startswith("orphaned")]
        assert len(orphaned) == (orphans or {}).get(label, 0), f"{label}: orphaned Optuna trials {orphaned}"
        assert not any(t.user_attrs.get("tune_trial_id") in children for t in orphaned), f"{label}: orphan with a run"
        orphan_numbers = {t.number for t in orphaned}
        trials = [t for t in trials if t.number not in orphan_numbers]
        assert not states.get("RUNNING") and not states.get("WAITING"), f"{label}: unfinished Optuna trials {states}"
        tids = [t.user_attrs.get("tune_trial_id") for t in trials]
        assert None not in tids and len(set(tids)) == len(tids), f"{label}: Optuna tune_trial_id attrs {tids}"
        assert set(tids) == set(children), f"{label}: Optuna trials {sorted(tids)} != MLflow children {sorted(children)}"
        assert len(trials) == num_samples, f"{label}: {len(trials)} trials, expected {num_samples}"
        by_tid = {t.user_attrs["tune_trial_id"]: t for t in trials}

        rec = TargetRecords(label, parent, children, by_tid)
        for tid, run in children.items():
            trial = by_tid[tid]
            tags = run.data.tags
            state = trial.state.name
            assert tags.get("oscqat.target") == label and tags.get("oscqat.campaign") == campaign
            assert tags.get("oscqat.state") == state, f"{label}/{tid}: MLflow state {tags.get('oscqat.state')} vs Optuna {state}"
            assert run.info.status == MLFLOW_STATUS[state], f"{label}/{tid}: status {run.info.status} for {state}"
            assert (tags.get("oscqat.pruned") == "true") == (state == "PRUNED"), f"{label}/{tid}: pruned tag vs {state}"
            # params: the sampled ones as Optuna has them and what the trial is (arch, bits, epochs); the
            # fixed rest of the config is on the parent run (and in train_config.yaml)
            params = run.data.params
            space_only = set(params) - set(trial.params) - {"arch", "bits", "epochs"}
            assert not space_only, f"{label}/{tid}: params the search did not choose: {sorted(space_only)}"
            for key, value in trial.params.items():
                assert key in params, f"{label}/{tid}: param {key} missing in MLflow"
                if isinstance(value, float):
                    assert math.isclose(float(params[key]), value, rel_tol=1e-9), (key, params[key], value)
                else:
                    assert params[key] == str(value), (key, params[key], value)
            assert params["arch"] == "demo_net" and params["bits"] == label.split("/")[1]
            assert parent.data.params["batch_size"] == "128" and parent.data.params["bn_reestimate_batches"] == "2"
            assert int(params["epochs"]) == max_epochs
            # per-epoch metrics: step = epoch, 1..n, each exactly once
            hist = {}
            for key in PER_EPOCH_METRICS:
                points = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
                steps = [s for s, _ in points]
                assert steps == list(range(1, len(steps) + 1)), f"{label}/{tid}: {key} steps {steps}"
                hist[key] = points
            n = len(hist["val_top1"])
            assert all(len(v) == n for v in hist.values()), f"{label}/{tid}: metric lengths differ"
            rec.histories[tid] = hist
            if state == "COMPLETE":
                assert n == max_epochs, f"{label}/{tid}: COMPLETE after {n} of {max_epochs} epochs"
                assert math.isclose(trial.value, hist["val_top1"][-1][1], rel_tol=1e-9)
            elif state == "PRUNED":
                assert 1 <= n < max_epochs, f"{label}/{tid}: PRUNED after {n} of {max_epochs} epochs"
            if state in ("COMPLETE", "PRUNED"):
                assert sorted(trial.intermediate_values) == list(range(1, n + 1)), (
                    f"{label}/{tid}: Optuna steps {sorted(trial.intermediate_values)} vs {n} MLflow epochs")
                if exact_values:
                    for step, value in hist["val_top1"]:
                        assert math.isclose(trial.intermediate_values[step], value, rel_tol=1e-9), (tid, step)
        # the parent's summary names the best COMPLETE trial
        complete = [t for t in trials if t.state.name == "COMPLETE"]
        assert complete, f"{label}: no COMPLETE trial"
        best = max(complete, key=lambda t: t.value)
        assert math.isclose(parent.data.metrics["best_val_top1"], best.value, rel_tol=1e-9)
        assert parent.data.tags.get("oscqat.best_trial_id") == best.user_attrs["tune_trial_id"]
        out[label] = rec
    return out


def best_trial(rec: TargetRecords):
    complete = [t for t in rec.trials.values() if t.state.name == "COMPLETE"]
    return max(complete, key=lambda t: t.value)


def assert_best_reported(output: str, rec: TargetRecords, status: str | None = None) -> None:
    """The CLI's results table has the target's row with the best trial id and value."""
    best = best_trial(rec)
    rows = [line for line in output.splitlines() if rec.label in line and "│" in line and "=" not in line]
    assert rows, f"no table row for {rec.label} in:\n{output[-3000:]}"  # ("=": the best params' table)
    row = rows[-1]
    assert best.user_attrs["tune_trial_id"] in row, row
    assert f"{best.value:.4f}" in row, row
    assert best.params["method"] in row, row
    if status is not None:
        assert re.search(rf"│\s*{status}\s*│", row), row


def assert_starting_points_first(rec: TargetRecords, names: list[str]) -> None:
    """The enqueued points are Optuna trials 0..len(names)-1, in file order, with exactly their values."""
    ordered = sorted(rec.trials.values(), key=lambda t: t.number)
    assert len(ordered) > len(names), "no sampled trial after the starting points"
    for trial, name in zip(ordered, names):
        assert trial.user_attrs.get("starting_point") == name, (trial.number, trial.user_attrs)
        for key, value in START_POINTS[name].items():
            got = trial.params.get(key)
            assert (math.isclose(got, value) if isinstance(value, float) else got == value), (name, key, got)
    for trial in ordered[len(names):]:
        assert "starting_point" not in trial.user_attrs, (trial.number, trial.user_attrs)


def trial_node_ids(experiment_dir: Path) -> dict[str, set[str]]:
    """Tune trial id -> node ids its results came from (Tune's per-trial result.json)."""
    out: dict[str, set[str]] = {}
    for result_file in experiment_dir.glob("*/result.json"):
        for line in result_file.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                out.setdefault(row["trial_id"], set()).add(row.get("node_id"))
    return out
