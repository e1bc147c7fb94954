"""MLflow unreachable or Optuna storage unusable at start: a clear error before any trial starts.

``search.runner.check_backends`` runs before Ray starts (``run`` and ``resume``). The message
names the URI with credentials redacted; the exit code is non-zero; nothing is written under
``ray_results``; no traceback.
"""

from __future__ import annotations

import os
import time

import pytest
import yaml
from typer.testing import CliRunner

from .helpers import clean_env, free_port, run_cli

SECRET = "Pa55-w0rd-xyz"


def _campaign(**kw) -> dict:
    return {"name": "pre", "targets": [{"arch": "demo_net", "bits": "w4a4"}],
            "base": {"batch_size": 128, "bn_reestimate_batches": 2}, **kw}


@pytest.fixture
def fast_mlflow_env(monkeypatch):
    """client_for() sets these process-wide when they are unset: set them here so they are restored."""
    for k, v in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                 ("MLFLOW_HTTP_REQUEST_TIMEOUT", "30"), ("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "false")):
        monkeypatch.setenv(k, v)


@pytest.mark.timeout(240)
def test_unreachable_mlflow_fails_fast_via_console_script(tmp_path):
    """The real ``oscqat`` process: MLflow's own retries (minutes by default) must not hold it up."""
    port = free_port()  # nothing listens there
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(_campaign(
        mlflow={"tracking_uri": f"http://alice:{SECRET}@127.0.0.1:{port}"}, optuna_storage="sqlite:///optuna.db")))
    env = {k: v for k, v in clean_env().items() if not k.startswith("MLFLOW_")}
    t0 = time.monotonic()
    proc = run_cli(["search", "run", "c.yaml"], cwd=tmp_path, env=env, timeout=200)
    took = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    flat = " ".join(out.split())
    assert proc.returncode != 0
    assert f"MLflow tracking URI 'http://alice:***@127.0.0.1:{port}' is unreachable" in flat, out
    assert SECRET not in out
    assert "Traceback" not in out
    assert not (tmp_path / "ray_results").exists()
    assert took < 120, f"pre-flight took {took:.0f}s"  # generous for a loaded 2-core machine; was ~250 s


@pytest.mark.timeout(120)
@pytest.mark.parametrize("storage,shown", [
    (f"postgresql://bob:{SECRET}@127.0.0.1:9/optuna", "postgresql://bob:***@127.0.0.1:9/optuna"),
    ("sqlite:////proc/oscqat-no-such-dir/optuna.db", "sqlite:////proc/oscqat-no-such-dir/optuna.db"),
    ("not-a-database-url", "not-a-database-url"),
])
def test_unusable_optuna_storage_is_refused_before_ray(tmp_path, monkeypatch, fast_mlflow_env, storage, shown):
    import ray

    import oscqat_cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(_campaign(optuna_storage=storage)))
    result = CliRunner().invoke(oscqat_cli.app, ["search", "run", "c.yaml"])
    flat = " ".join(result.output.split())
    assert result.exit_code not in (0, None) and isinstance(result.exception, SystemExit), result.output
    assert f"Optuna storage '{shown}' is unusable" in flat, result.output
    assert SECRET not in result.output and "Traceback" not in result.output
    assert sorted(os.listdir(tmp_path)) == ["c.yaml"]  # the Optuna check comes first: nothing written
    assert not ray.is_initialized()


@pytest.mark.timeout(120)
def test_unusable_mlflow_store_is_refused_before_ray(tmp_path, monkeypatch, fast_mlflow_env):
    import ray

    import oscqat_cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(_campaign(
        mlflow={"tracking_uri": "sqlite:////proc/oscqat-no-such-dir/mlflow.db"}, optuna_storage="sqlite:///optuna.db")))
    result = CliRunner().invoke(oscqat_cli.app, ["search", "run", "c.yaml"])
    flat = " ".join(result.output.split())
    assert result.exit_code not in (0, None) and isinstance(result.exception, SystemExit), result.output
    assert "MLflow tracking URI 'sqlite:////proc/oscqat-no-such-dir/mlflow.db' is unreachable or unusable" in flat
    assert "Traceback" not in result.output
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "mlflow.db").exists()
    assert not ray.is_initialized()


@pytest.mark.timeout(120)
def test_resume_with_unreachable_mlflow_is_refused_before_ray(tmp_path, monkeypatch, fast_mlflow_env):
    """``oscqat search resume`` runs the same pre-flight check."""
    import ray

    import oscqat_cli

    monkeypatch.chdir(tmp_path)
    port = free_port()
    camp_dir = tmp_path / "ray_results" / "pre"
    camp_dir.mkdir(parents=True)
    (camp_dir / "campaign.yaml").write_text(yaml.safe_dump(_campaign(
        mlflow={"tracking_uri": f"http://alice:{SECRET}@127.0.0.1:{port}"}, optuna_storage="sqlite:///optuna.db")))
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "ray_results").rglob("*"))
    result = CliRunner().invoke(oscqat_cli.app, ["search", "resume", "pre"])
    flat = " ".join(result.output.split())
    assert result.exit_code not in (0, None) and isinstance(result.exception, SystemExit), result.output
    assert f"'http://alice:***@127.0.0.1:{port}' is unreachable" in flat, result.output
    assert SECRET not in result.output and "Traceback" not in result.output
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "ray_results").rglob("*")) == before
    assert not ray.is_initialized()
