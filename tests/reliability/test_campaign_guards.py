"""Guards that act before or around a campaign, tested without starting Ray: the driver lock,
pre-flight validation (refused with exit 2, the field named, nothing written), input file limits,
``report export`` overwrites, and store identity."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import yaml
from typer.testing import CliRunner

pytestmark = pytest.mark.timeout(120)

CAMPAIGN = {"name": "g", "targets": [{"arch": "demo_net", "bits": "w4a4"}],
            "base": {"batch_size": 128, "bn_reestimate_batches": 2},
            "budget": {"num_samples": 2, "max_epochs": 2, "grace_period": 1, "allow_early_rungs": True},
            "confirm": None}


def _write(tmp_path, **changes) -> None:
    data = yaml.safe_load(yaml.safe_dump(CAMPAIGN))
    data.update(changes)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))


class _Result:
    """CliRunner's result with the output's line wrapping (rich wraps at the terminal width) undone."""

    def __init__(self, result):
        self.exit_code = result.exit_code
        self.output = " ".join(result.output.split())


def _run(args):
    import oscqat_cli

    return _Result(CliRunner().invoke(oscqat_cli.app, args))


# ---------------------------------------------------------------------------- lock
def test_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    from search.lock import CampaignLock, CampaignLocked

    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.getcwd()!r})
        from search.lock import CampaignLock
        lock = CampaignLock({str(tmp_path)!r}, "g").acquire()
        print("held", flush=True)
        time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CampaignLocked) as info:
            CampaignLock(tmp_path, "g").acquire()
        assert f"pid {holder.pid}" in str(info.value) and "already being run" in str(info.value)
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock file remains, and is recognised as stale
    lock = CampaignLock(tmp_path, "g").acquire()
    assert lock.stale and lock.stale["pid"] == holder.pid
    lock.release()


def test_second_driver_is_refused_at_once_by_the_cli(tmp_path, monkeypatch):
    """`oscqat search run` / `resume` while another driver holds the campaign: exit 1, clear message."""
    from search.lock import CampaignLock

    monkeypatch.chdir(tmp_path)
    _write(tmp_path)
    camp_dir = tmp_path / "ray_results" / "g"
    (camp_dir).mkdir(parents=True)
    with CampaignLock(camp_dir, "g"):  # another driver (this process) holds it
        result = _run(["search", "run", "c.yaml"])
        assert result.exit_code == 1, result.output
        assert "already being run by another driver" in result.output and f"pid {os.getpid()}" in result.output
        (camp_dir / "campaign.yaml").write_text(yaml.safe_dump(CAMPAIGN))
        result = _run(["search", "resume", "g"])
        assert result.exit_code == 1, result.output
        assert "already being run by another driver" in result.output
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists()


# ---------------------------------------------------------------------------- pre-flight
def _fp(tmp_path, arch="demo_net"):
    import torch

    from oscqat.models.registry import create_model

    path = tmp_path / f"{arch}.pt"
    torch.save(create_model(arch, num_classes=10, in_chans=1 if arch == "demo_net" else 3).state_dict(), path)
    return path


def _truncated(tmp_path):
    path = _fp(tmp_path)
    data = path.read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    return bad


def _empty(tmp_path):
    bad = tmp_path / "empty.pt"
    bad.write_bytes(b"")
    return bad


def _wrong_arch(tmp_path):
    return _fp(tmp_path, "resnet18")


@pytest.mark.parametrize("make, message", [
    (_truncated, "not a readable torch checkpoint"),
    (_empty, "is empty"),
    (_wrong_arch, "is not a demo_net checkpoint"),
])
def test_bad_pretrained_checkpoint_is_refused_before_anything_is_written(make, message, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    bad = make(tmp_path)
    _write(work, targets=[{"arch": "demo_net", "bits": "w4a4", "pretrained": str(bad)}])
    result = _run(["search", "run", "c.yaml"])
    assert result.exit_code == 2, result.output
    assert "targets[0].pretrained" in result.output and message in result.output, result.output
    assert "Traceback" not in result.output
    assert sorted(os.listdir(work)) == ["c.yaml"]


def test_storage_path_that_is_a_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results").write_text("not a folder")
    _write(tmp_path, storage_path="results")
    result = _run(["search", "run", "c.yaml"])
    assert result.exit_code == 2, result.output
    assert "storage_path" in result.output and "not a directory" in result.output
    assert sorted(os.listdir(tmp_path)) == ["c.yaml", "results"]


def test_seed_that_overflows_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(CAMPAIGN) + "seed: 1e23\n")
    result = _run(["search", "run", "c.yaml"])
    assert result.exit_code == 2, result.output
    assert "seed" in result.output
    assert sorted(os.listdir(tmp_path)) == ["c.yaml"]


@pytest.mark.parametrize("resources, field", [({"gpu": 1}, "resources.gpu"), ({"cpu": 1024}, "resources.cpu")])
def test_unsatisfiable_resources_are_refused(resources, field):
    from oscqat.config import ConfigError
    from search.campaign import Campaign
    from search.preflight import check_resources

    camp = Campaign.model_validate({**CAMPAIGN, "resources": resources})
    with pytest.raises(ConfigError) as info:
        check_resources(camp, {"CPU": 2.0, "memory": 1e9})
    assert str(info.value).startswith(field) and "the Ray cluster has" in str(info.value)
    check_resources(Campaign.model_validate(CAMPAIGN), {"CPU": 2.0})  # what fits passes


def test_resources_are_checked_before_the_campaign_is_written(tmp_path, monkeypatch):
    """Local Ray: refused before anything is written or started (`resources: {gpu: 1}` hung forever)."""
    import ray

    from oscqat.config import ConfigError
    from search import preflight, runner
    from search.campaign import Campaign

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(preflight, "local_resources", lambda: {"CPU": 2.0, "GPU": 0.0})
    camp = Campaign.model_validate({**CAMPAIGN, "resources": {"gpu": 1}})
    with pytest.raises(ConfigError, match="resources.gpu"):
        runner.run_campaign(camp)
    assert os.listdir(tmp_path) == [] and not ray.is_initialized()


def test_cluster_resources_are_checked_before_the_campaign_is_written(tmp_path, monkeypatch):
    """A Ray cluster (--address): asked right after ray.init, before campaign.yaml; the folder goes again."""
    from oscqat.config import ConfigError
    from search import runner
    from search.campaign import Campaign

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runner, "init_ray", lambda address: None)
    monkeypatch.setattr(runner, "_cluster_resources", lambda: {"CPU": 8.0})
    camp = Campaign.model_validate({**CAMPAIGN, "resources": {"cpu": 1024}, "storage_path": str(tmp_path / "rr")})
    with pytest.raises(ConfigError, match="resources.cpu"):
        runner.run_campaign(camp, address="ray://head:10001")
    assert not (tmp_path / "rr").exists()


# ---------------------------------------------------------------------------- input files
def test_oversized_input_file_is_refused_before_parsing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(CAMPAIGN) + "junk: [" + "1, " * 600_000 + "1]\n")
    result = _run(["search", "run", "c.yaml"])
    assert result.exit_code == 2, result.output
    assert "limited to" in result.output and "bytes" in result.output


@pytest.mark.parametrize("text, key", [
    ("name: a\nname: b\ntargets: [{arch: demo_net, bits: w4a4}]\n", "name"),
    ("name: a\ntargets: [{arch: demo_net, bits: w4a4, bits: w3a3}]\n", "bits"),
])
def test_duplicate_yaml_keys_are_refused(text, key, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(text)
    result = _run(["search", "run", "c.yaml"])
    assert result.exit_code == 2, result.output
    assert f"duplicate key {key!r}" in result.output
    assert sorted(os.listdir(tmp_path)) == ["c.yaml"]


def test_duplicate_keys_refused_by_train_too(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.yaml").write_text("arch: demo_net\nepochs: 1\nepochs: 500\n")
    result = _run(["train", "t.yaml"])
    assert result.exit_code == 2 and "duplicate key 'epochs'" in result.output, result.output


# ---------------------------------------------------------------------------- stores
def test_store_identity_detects_deletion_and_replacement(tmp_path):
    from search.store_watch import StoreChanged, StoreWatcher, check_stores, identity

    db = tmp_path / "optuna.db"
    db.write_bytes(b"x")
    uri = f"sqlite:///{db}?timeout=30"
    stores = {uri: identity(uri), "postgresql://u:pw@h/db": identity("postgresql://u:pw@h/db")}
    check_stores(stores)  # unchanged: fine
    assert StoreWatcher(stores).check() is None
    other = tmp_path / "other.db"
    other.write_bytes(b"y")  # made while the original exists, so it cannot reuse its inode
    db.unlink()
    with pytest.raises(StoreChanged, match="was deleted"):
        check_stores(stores)
    other.rename(db)  # another file put in its place (a fresh or foreign history)
    with pytest.raises(StoreChanged, match="replaced"):
        check_stores(stores)


# ---------------------------------------------------------------------------- report export
def test_export_refuses_to_overwrite_without_force(tmp_path):
    """``report export --out FILE`` overwrote (and uploaded) an existing file silently; checked before
    the store is even read (the full CLI round trip is in tests/reports/test_reports_export.py)."""
    from reports.export import export_trial
    from reports.store import ReportError

    out = tmp_path / "best.yaml"
    out.write_text("# my edited config\n")
    with pytest.raises(ReportError) as info:
        export_trial(None, "demo_net/w4a4", out)
    assert info.value.code == 2 and "--force" in str(info.value)
    assert out.read_text() == "# my edited config\n"
    with pytest.raises(ReportError, match="not a file"):
        export_trial(None, "demo_net/w4a4", tmp_path, overwrite=True)


# ---------------------------------------------------------------------------- faults under a running campaign
def _fault_under_target(tmp_path, monkeypatch, fault: BaseException):
    """_run_targets with the target's bookkeeping done (parent run, state ``running``) and then ``fault``
    raised where Tune's fit() would raise it; Ray is not started."""
    from search import runner
    from search.campaign import Campaign
    from search.tracking import client_for, ensure_parent_run, get_or_create_experiment

    monkeypatch.chdir(tmp_path)
    camp = runner._absolute_stores(Campaign.model_validate({**CAMPAIGN, "storage_path": str(tmp_path / "rr")}))
    camp_dir = camp.campaign_dir()
    camp_dir.mkdir(parents=True)
    client = client_for(camp.mlflow.tracking_uri)
    exp = get_or_create_experiment(client, camp.experiment_name)

    def fake_run_target(campaign, target, space, campaign_dir, experiment_id, state, resume):
        parent = ensure_parent_run(client, experiment_id, campaign.name, target, {})
        child = client.create_run(experiment_id, tags={"mlflow.parentRunId": parent}).info.run_id
        state["targets"][target.label] = {"parent_run_id": parent, "experiment_id": experiment_id,
                                          "status": "running", "child": child}
        runner.write_state(campaign_dir, state)
        raise fault

    monkeypatch.setattr(runner, "init_ray", lambda address: None)
    monkeypatch.setattr(runner, "_run_target", fake_run_target)
    state = {"targets": {}, "stores": runner._store_identities(camp)}
    with pytest.raises(runner.CampaignError) as info:
        runner._run_targets(camp, {"demo_net/w4a4": None}, camp_dir, exp, state, None, False)
    saved = runner.read_state(camp_dir)["targets"]["demo_net/w4a4"]
    return str(info.value), saved, client


@pytest.mark.parametrize("fault, shown", [
    (OSError(28, "No space left on device"), "No space left on device"),  # a full disk under storage_path
    (__import__("sqlalchemy").exc.OperationalError("UPDATE trials", {}, Exception("database is locked")),
     "database is locked"),  # the Optuna storage locked / read-only mid-campaign
])
def test_backend_or_disk_failure_mid_campaign_stops_cleanly(fault, shown, tmp_path, monkeypatch):
    message, saved, client = _fault_under_target(tmp_path, monkeypatch, fault)
    assert shown in message and "oscqat search resume g" in message and "Traceback" not in message
    assert saved["status"] == "running"  # resumable, not done
    for run_id in (saved["parent_run_id"], saved["child"]):  # not left RUNNING silently
        run = client.get_run(run_id)
        assert run.info.status == "KILLED" and shown in run.data.tags["oscqat.interrupted"]
