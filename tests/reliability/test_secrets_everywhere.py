"""Every path that prints an exception or a URI hides a canary secret, in each form a URI carries one.

No Ray starts here: the paths are called directly (or through typer's CliRunner) with backends that
fail on purpose, and what reaches stdout, stderr, log records and files is searched for the canary.
"""

from __future__ import annotations

import logging

import pytest
import yaml
from typer.testing import CliRunner

pytestmark = pytest.mark.timeout(120)

CANARY = "Cnry7x9Q2z"
# (uri holding the canary, what must survive redaction)
FORMS = {
    "user-password": (f"http://alice:{CANARY}@127.0.0.1:9", "alice:***@127.0.0.1:9"),
    "token-only": (f"http://:{CANARY}@127.0.0.1:9", ":***@127.0.0.1:9"),
    "password-with-at": (f"postgresql://bob:p@{CANARY}@127.0.0.1:9/optuna", "bob:***@127.0.0.1:9/optuna"),
    "bare-token": (f"https://{CANARY}abcdefghijkl@127.0.0.1:9", "https://***@127.0.0.1:9"),
    "password-with-slash": (f"s3://AKIAEXAMPLE:ab/{CANARY}@bucket/data", "AKIAEXAMPLE:***@bucket/data"),
    "query-token": (f"http://127.0.0.1:9/x?access_token={CANARY}&a=1", "access_token=***&a=1"),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_redact_every_form(form):
    from search.uris import redact

    uri, kept = FORMS[form]
    out = redact(f"error talking to {uri}: refused")
    assert CANARY not in out and kept in out, out


def test_redact_environment_style_assignments():
    from search.uris import redact

    out = redact(f"env: AWS_SECRET_ACCESS_KEY={CANARY} HOME=/root password: {CANARY}")
    assert CANARY not in out and "HOME=/root" in out


def test_redact_leaves_plain_uris_alone():
    from search.uris import redact

    for uri in ("http://127.0.0.1:5000/path@x", "sqlite:////tmp/a.db?timeout=10", "postgresql://user@db/optuna",
                "s3://bucket/key"):
        assert redact(uri) == uri


@pytest.mark.parametrize("form", ["user-password", "token-only", "password-with-at"])
def test_check_backends_errors_hide_the_secret(form, tmp_path, monkeypatch):
    from search.campaign import Campaign
    from search.runner import CampaignError, check_backends

    monkeypatch.chdir(tmp_path)
    uri = FORMS[form][0]
    pg = uri.replace("http://", "postgresql://").replace("https://", "postgresql://")
    camp = Campaign.model_validate({"name": "c", "targets": [{"arch": "demo_net", "bits": "w4a4"}],
                                    "optuna_storage": pg})
    with pytest.raises(CampaignError) as info:
        check_backends(camp)
    assert CANARY not in str(info.value)
    camp = Campaign.model_validate({"name": "c", "targets": [{"arch": "demo_net", "bits": "w4a4"}],
                                    "optuna_storage": f"sqlite:///{tmp_path / 'o.db'}", "mlflow": {"tracking_uri": uri}})
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with pytest.raises(CampaignError) as info:
        check_backends(camp)
    assert CANARY not in str(info.value)


class _DownClient:
    """An MlflowClient stand-in whose every call fails with the URI (and its secret) in the message."""

    def __init__(self, uri):
        self.uri = uri

    def __getattr__(self, name):
        def fail(*a, **k):
            raise ConnectionError(f"HTTPConnectionPool: max retries exceeded with url {self.uri}/api/2.0/{name}")
        return fail


@pytest.mark.parametrize("form", list(FORMS))
def test_summarise_parent_log_hides_the_secret(form, tmp_path, monkeypatch, caplog):
    """results.summarise_parent logged the raw exception (password included) when MLflow was down."""
    from search import results
    from search.campaign import Campaign

    monkeypatch.chdir(tmp_path)
    camp = Campaign.model_validate({"name": "c", "targets": [{"arch": "demo_net", "bits": "w4a4"}],
                                    "optuna_storage": f"sqlite:///{tmp_path / 'o.db'}"})
    monkeypatch.setattr(results, "target_result",
                        lambda c, t, *_: results.TargetResult(t.label, "t1", 0.5, "lsq", {}, {"COMPLETE": 1}))
    with caplog.at_level(logging.WARNING):
        results.summarise_parent(camp, camp.targets[0], _DownClient(FORMS[form][0]), "pid", {})
    assert "could not write the summary" in caplog.text and CANARY not in caplog.text


@pytest.mark.parametrize("form", ["user-password", "token-only", "password-with-at", "bare-token"])
def test_log_redaction_filter_covers_third_party_records(form, capsys):
    """The CLIs install a filter on the root handlers: any library's record that quotes a URI is redacted."""
    from search.uris import RedactingFilter

    handler = logging.StreamHandler()
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("some.library")
    logger.addHandler(handler)
    try:
        logger.warning("View run x at: %s/#/experiments/1", FORMS[form][0])
        try:
            raise RuntimeError(f"connect failed: {FORMS[form][0]}")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    err = capsys.readouterr().err
    assert "View run" in err and "connect failed" in err and CANARY not in err


@pytest.mark.parametrize("form", ["user-password", "token-only", "password-with-at"])
def test_next_steps_hint_hides_the_secret(form, capsys):
    from search.campaign import Campaign
    from search.cli import _print_next_steps

    camp = Campaign.model_validate({"name": "c", "targets": [{"arch": "demo_net", "bits": "w4a4"}],
                                    "mlflow": {"tracking_uri": FORMS[form][0]},
                                    "optuna_storage": FORMS[form][0].replace("http", "postgresql", 1)})
    _print_next_steps(camp)
    out = capsys.readouterr().out
    assert "MLflow UI" in out and CANARY not in out


def test_token_only_uri_turns_on_mlflow_url_suppression(monkeypatch):
    """``http://:TOKEN@host`` slipped past redact, so MLflow printed "View run ... at http://:TOKEN@..."."""
    from search.tracking import client_for

    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    client_for(FORMS["token-only"][0])
    import os

    assert os.environ.get("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT") == "true"


@pytest.mark.parametrize("form", ["user-password", "token-only", "password-with-at"])
def test_report_cli_backend_errors_hide_the_secret(form, tmp_path, monkeypatch):
    """`oscqat report ...` turns backend failures into one line: without the secret."""
    import oscqat_cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    camp_dir = tmp_path / "ray_results" / "c"
    camp_dir.mkdir(parents=True)
    (camp_dir / "campaign.yaml").write_text(yaml.safe_dump(
        {"name": "c", "targets": [{"arch": "demo_net", "bits": "w4a4"}], "mlflow": {"tracking_uri": FORMS[form][0]},
         "optuna_storage": f"sqlite:///{tmp_path / 'o.db'}"}))
    result = CliRunner().invoke(oscqat_cli.app, ["report", "compare", "c", "--tracking-uri", FORMS[form][0]])
    assert result.exit_code != 0
    assert CANARY not in result.output, result.output


# ---------------------------------------------------------------------------- nothing written holds a secret
def test_data_dir_with_credentials_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """``base.data_dir: s3://KEY:SECRET@...`` reached every trial's train_config.yaml, trainer.pt and tuner.pkl."""
    import os

    import oscqat_cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(
        {"name": "c", "targets": [{"arch": "demo_net", "bits": "w4a4"}],
         "base": {"data_dir": f"s3://AKIAEXAMPLE:{CANARY}@bucket/digits"}}))
    result = CliRunner().invoke(oscqat_cli.app, ["search", "run", "c.yaml"])
    assert result.exit_code == 2, result.output
    assert "base.data_dir" in result.output and CANARY not in result.output
    assert sorted(os.listdir(tmp_path)) == ["c.yaml"]


def test_stored_uris_are_masked_and_revealed_from_the_environment(tmp_path, monkeypatch):
    """campaign.yaml keeps ``user:***@``; the live process (or resume, via the environment) gets the full URI."""
    from search import uris
    from search.campaign import Campaign
    from search.runner import _absolute_stores

    full = f"http://alice:{CANARY}@mlflow.internal:5000"
    camp = _absolute_stores(Campaign.model_validate(
        {"name": "c", "targets": [{"arch": "demo_net", "bits": "w4a4"}], "mlflow": {"tracking_uri": full}}))
    dumped = yaml.safe_dump(camp.model_dump(mode="json"))
    assert CANARY not in dumped and "alice:***@mlflow.internal" in dumped
    assert uris.reveal(camp.mlflow.tracking_uri) == full  # this process was given it
    uris._remembered.clear()  # a new process (resume)
    with pytest.raises(uris.CredentialsMissing, match="MLFLOW_TRACKING_URI"):
        uris.reveal(camp.mlflow.tracking_uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", full)
    assert uris.reveal(camp.mlflow.tracking_uri) == full


def test_masked_optuna_storage_pickles_without_the_password(tmp_path):
    """Tune pickles the searcher (with its storage) into tuner.pkl / searcher state."""
    import pickle

    from search import uris
    from search.searcher import _MaskedRDBStorage

    full = f"sqlite:///{tmp_path / 'o.db'}?password={CANARY}"
    masked = uris.remember(full)
    assert CANARY not in masked
    storage = _MaskedRDBStorage(masked)
    blob = pickle.dumps(storage)
    assert CANARY.encode() not in blob
    assert pickle.loads(blob).get_all_studies() == []


# ---------------------------------------------------------------------------- Ray
def test_ray_does_not_forward_aws_secrets_into_runtime_env(monkeypatch):
    """Ray Tune copies AWS_* from the driver into each trial actor's runtime_env (and its logs)."""
    from ray.tune.execution.class_cache import _ActorClassCache

    from search.runner import _keep_secrets_out_of_runtime_env

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CANARY)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    _keep_secrets_out_of_runtime_env()

    class Trainable:
        pass

    remote = _ActorClassCache().get(Trainable)
    env = remote._default_options.get("runtime_env", {}).get("env_vars", {})
    assert CANARY not in repr(env) and "AWS_ACCESS_KEY_ID" not in env


def test_local_ray_binds_localhost_with_a_private_temp_dir(monkeypatch, tmp_path):
    import os
    import stat

    import ray

    from search import runner

    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    monkeypatch.setenv("OSCQAT_RAY_TMPDIR", str(tmp_path / "raytmp"))
    runner.init_ray(None)
    assert seen["_node_ip_address"] == "127.0.0.1" and seen["include_dashboard"] is False
    mode = stat.S_IMODE(os.stat(seen["_temp_dir"]).st_mode)
    assert mode == 0o700, oct(mode)
    seen.clear()  # a RAY_TMPDIR the user chose is Ray's to use, made private
    monkeypatch.delenv("OSCQAT_RAY_TMPDIR")
    (tmp_path / "mine").mkdir(mode=0o755)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "mine"))
    runner.init_ray(None)
    assert "_temp_dir" not in seen and stat.S_IMODE(os.stat(tmp_path / "mine").st_mode) == 0o700
    seen.clear()
    runner.init_ray("ray://head:10001")  # a cluster: its operator decides (docs/RELIABILITY.md)
    assert "_node_ip_address" not in seen
