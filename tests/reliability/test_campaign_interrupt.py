"""Stopping a running campaign: Ctrl+C, SIGTERM, a second driver, a store deleted under it.

Real ``oscqat search run`` subprocesses on local Ray, one tiny target (demo_net w3a3 on digits, two
trials of three epochs, a checkpoint every epoch, the FP checkpoint made here). Before the fix a
SIGINT made Tune's ``fit()`` return normally: the target was marked done, its live trials FAIL in
Optuna with their MLflow runs left RUNNING, and ``resume`` said "already finished".
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from .helpers import OSCQAT, TINY_BASE, clean_env, count_reported_epochs, read_results, run_cli, trial_dirs

pytestmark = pytest.mark.timeout(900)
EPOCHS = 3
PACE_S = 3.0  # 2 trials x 3 epochs one at a time: >= 15 s of work left after the first epoch


def _campaign(work: Path, name: str, fp: Path) -> None:
    (work / "c.yaml").write_text(yaml.safe_dump({
        "name": name, "dataset": "digits",
        "targets": [{"arch": "demo_net", "bits": "w3a3", "pretrained": str(fp)}],
        "base": TINY_BASE, "budget": {"num_samples": 2, "max_epochs": EPOCHS, "grace_period": EPOCHS,
                                      "enqueue_starting_points": False},
        "confirm": None,  # the confirm stage has its own kill-and-resume test
        "resources": {"cpu": 1}, "max_concurrent_trials": 1, "checkpoint_interval_s": 0,
    }, sort_keys=False))


@pytest.fixture(scope="module")
def fp_checkpoint(tmp_path_factory) -> Path:
    from oscqat.config import TrainConfig
    from oscqat.trainer import Trainer

    cfg = TrainConfig(arch="demo_net", bits="fp32", dataset="digits", epochs=1, batch_size=128, lr=0.05,
                      bn_reestimate_batches=0, device="cpu")
    trainer = Trainer(cfg)
    trainer.fit()
    return trainer.save_model(tmp_path_factory.mktemp("fp") / "demo_net.pt")


def _start(work: Path, *args: str) -> subprocess.Popen:
    log = work / f"out-{time.monotonic_ns()}.txt"
    with open(log, "w") as out:
        # every epoch takes at least PACE_S, and while the gate file exists no trial starts an
        # epoch: a signal sent with the gate closed always lands while work remains
        env = clean_env(OSCQAT_FAULT_INJECT="sleep@*,gate@*", OSCQAT_FAULT_SLEEP_S=str(PACE_S),
                        OSCQAT_FAULT_GATE=str(work / "gate"))
        proc = subprocess.Popen([OSCQAT, "search", *args], cwd=work, env=env, text=True,
                                stdout=out, stderr=subprocess.STDOUT)
    proc.log_path = log
    return proc


def _wait_epochs(exp: Path, n: int, proc: subprocess.Popen, timeout_s: float = 400) -> None:
    deadline = time.monotonic() + timeout_s
    while count_reported_epochs(exp) < n:
        assert proc.poll() is None, "the campaign ended before it could be interrupted"
        assert time.monotonic() < deadline, "no epochs reported in time"
        time.sleep(0.5)


def _wait_output(proc: subprocess.Popen, text: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in _output(proc):
        assert proc.poll() is None, _output(proc)
        assert time.monotonic() < deadline, f"no {text!r} in the output in time"
        time.sleep(0.5)


def _output(proc: subprocess.Popen) -> str:
    return proc.log_path.read_text(errors="replace")


def _optuna_states(work: Path) -> list[str]:
    with sqlite3.connect(work / "optuna.db") as c:
        return [r[0] for r in c.execute("select state from trials order by number")]


def _mlflow_runs(work: Path) -> dict[str, tuple[str, str | None]]:
    """run name -> (status, oscqat.interrupted tag)"""
    with sqlite3.connect(work / "mlflow.db") as c:
        rows = c.execute("select r.name, r.status, t.value from runs r left join tags t on t.run_uuid = r.run_uuid "
                         "and t.key = 'oscqat.interrupted'").fetchall()
    return {name: (status, tag) for name, status, tag in rows}


def _state(work: Path, name: str) -> dict:
    return json.loads((work / "ray_results" / name / "state.json").read_text())


def test_ctrl_c_and_sigterm_stop_the_campaign_resumably(tmp_path, fp_checkpoint):
    work = tmp_path
    _campaign(work, "intr", fp_checkpoint)
    exp = work / "ray_results" / "intr" / "demo_net-w3a3"

    proc = _start(work, "run", "c.yaml")
    _wait_epochs(exp, 1, proc)
    (work / "gate").touch()  # from here no trial starts another epoch: work remains, however slow the checks
    # a second driver on the same campaign is refused at once, while the first holds it
    second = run_cli(["search", "run", "c.yaml"], cwd=work, timeout=120)
    assert second.returncode == 1, second.stdout + second.stderr
    assert "already being run by another driver" in " ".join((second.stdout + second.stderr).split())
    assert f"pid {proc.pid}" in second.stdout + second.stderr
    resumed_early = run_cli(["search", "resume", "intr"], cwd=work, timeout=120)
    assert resumed_early.returncode == 1
    assert "already being run" in " ".join((resumed_early.stdout + resumed_early.stderr).split())

    proc.send_signal(signal.SIGINT)  # Ctrl+C
    assert proc.wait(timeout=300) == 130, _output(proc)
    out = _output(proc)
    assert "SIGINT received" in out and "Continue with: oscqat search resume intr" in " ".join(out.split())
    state = _state(work, "intr")
    assert state["targets"]["demo_net/w3a3"]["status"] == "running"  # not done
    assert "FAIL" not in _optuna_states(work)  # live trials not failed as orphans
    runs = _mlflow_runs(work)
    assert runs["intr · demo_net w3a3 · search"] == ("KILLED", "stopped by SIGINT")  # the parent, not left RUNNING
    assert all(status != "RUNNING" for status, _ in runs.values()), runs

    # resume restarts the trials (held at the gate, which is still closed); SIGTERM stops it the
    # same way, with work certainly left (the last resume below checks nothing trained twice)
    assert count_reported_epochs(exp) < 2 * EPOCHS
    proc = _start(work, "resume", "intr")
    _wait_output(proc, "started")  # a trial runs: the driver is inside Tune, its handlers installed
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM, _output(proc)
    assert _state(work, "intr")["targets"]["demo_net/w3a3"]["status"] == "running"
    assert "FAIL" not in _optuna_states(work)

    (work / "gate").unlink()
    final = run_cli(["search", "resume", "intr"], cwd=work, timeout=600)
    assert final.returncode == 0, final.stdout + final.stderr
    assert "already finished" not in final.stdout
    assert _state(work, "intr")["targets"]["demo_net/w3a3"]["status"] == "done"
    assert _optuna_states(work) == ["COMPLETE", "COMPLETE"]
    runs = _mlflow_runs(work)
    assert all(status == "FINISHED" and tag is None for status, tag in runs.values()), runs
    for d in trial_dirs(exp):  # every epoch trained once: resumed from checkpoints, not from scratch
        assert [int(r["epoch"]) for r in read_results(d / "result.json")] == list(range(1, EPOCHS + 1))


def test_deleted_optuna_store_stops_the_campaign(tmp_path, fp_checkpoint):
    """Deleting optuna.db under a running campaign was silent (exit 0, a new empty study, 'complete 0')."""
    work = tmp_path
    _campaign(work, "gone", fp_checkpoint)
    exp = work / "ray_results" / "gone" / "demo_net-w3a3"
    proc = _start(work, "run", "c.yaml")
    _wait_epochs(exp, 1, proc)
    (work / "gate").touch()  # from here no trial starts another epoch: work remains, however slow the checks
    for suffix in ("", "-wal", "-shm"):
        Path(f"{work / 'optuna.db'}{suffix}").unlink(missing_ok=True)
    code = proc.wait(timeout=300)
    out = " ".join(_output(proc).split())
    assert code == 1, out
    assert "optuna.db was deleted" in out and "oscqat search resume" in out
    assert _state(work, "gone")["targets"]["demo_net/w3a3"]["status"] == "running"
    # resume refuses too, before Optuna would create a fresh, empty study
    again = run_cli(["search", "resume", "gone"], cwd=work, timeout=120)
    assert again.returncode == 1 and "was deleted" in " ".join((again.stdout + again.stderr).split())
    assert not (work / "optuna.db").exists()
