"""Security: no code runs from checkpoints or YAML, servers bind localhost, secrets stay out of logs.

(The end-to-end secrets check, a campaign whose tracking URI and base values carry credentials,
is ``test_campaign_faults.py::test_secrets_are_not_logged_or_printed``.)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from .helpers import ROOT

pytestmark = pytest.mark.timeout(120)

SOURCE_DIRS = ("oscqat", "spaces", "search", "reports", "bench", "scripts")
THIS_FILE = Path(__file__).resolve()


def source_files(*suffixes: str, include_tests: bool = False) -> list[Path]:
    files = [ROOT / "oscqat_cli.py"]
    for d in SOURCE_DIRS + (("tests",) if include_tests else ()):
        if (ROOT / d).is_dir():
            files += [p for p in (ROOT / d).rglob("*") if p.suffix in suffixes and p.is_file()]
    return sorted(p for p in files if p.resolve() != THIS_FILE and "__pycache__" not in p.parts)


# ---------------------------------------------------------------------------- pickles
class _Payload:
    """Unpickling this runs ``touch <marker>`` (a classic ``__reduce__`` code-execution payload)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def evil_checkpoint(tmp_path):
    marker = tmp_path / "PAYLOAD_RAN"
    path = tmp_path / "evil.pt"
    torch.save({"model": _Payload(marker), "version": 1}, path)
    return path, marker


def test_payload_is_real(evil_checkpoint):
    """Control: an unrestricted unpickler would run it (in a throwaway process)."""
    path, marker = evil_checkpoint
    subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(path)!r}, weights_only=False)"],
                   capture_output=True, timeout=120)
    assert marker.exists()


def test_pretrained_file_with_payload_is_refused(evil_checkpoint):
    from oscqat.models import create_model

    path, marker = evil_checkpoint
    with pytest.raises(ValueError, match="refused to load"):
        create_model("demo_net", num_classes=10, pretrained=str(path), in_chans=1)
    assert not marker.exists()


def test_training_checkpoint_with_payload_is_refused(evil_checkpoint):
    from oscqat.trainer import Trainer

    path, marker = evil_checkpoint
    with pytest.raises(ValueError, match="refused to load"):
        Trainer.load(path)
    assert not marker.exists()


def test_cli_refuses_payload_without_traceback(evil_checkpoint, monkeypatch):
    import oscqat_cli

    path, marker = evil_checkpoint
    monkeypatch.chdir(path.parent)
    (path.parent / "t.yaml").write_text(f"arch: demo_net\nbits: w4a4\nepochs: 1\npretrained: {path}\n")
    result = CliRunner().invoke(oscqat_cli.app, ["train", "t.yaml", "--no-track"])
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit)
    assert "refused to load" in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not marker.exists()


def test_every_torch_load_is_weights_only():
    calls = []
    for f in source_files(".py"):
        text = f.read_text(errors="replace")
        for m in re.finditer(r"torch\.load\(", text):
            depth, i = 1, m.end()
            while depth and i < len(text):
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            call = text[m.start():i]
            if call.startswith("torch.load(...") or "``" in text[max(0, m.start() - 2):m.start()]:
                continue  # prose in a docstring
            calls.append((f.relative_to(ROOT), call))
    assert calls, "expected torch.load calls to check"
    unsafe = [(str(f), c) for f, c in calls if "weights_only=True" not in c]
    assert not unsafe, unsafe
    assert not [f for f in source_files(".py") if re.search(r"\bpickle\.loads?\(", f.read_text(errors="replace"))]


# ---------------------------------------------------------------------------- YAML
EVIL_YAML = [
    "!!python/object/apply:os.system ['touch {marker}']\n",
    "arch: !!python/object/apply:os.system ['touch {marker}']\nbits: w4a4\n",
    "name: !!python/object/new:subprocess.Popen [['touch', '{marker}']]\ntargets: []\n",
]


@pytest.mark.parametrize("command", [["train"], ["search", "run"], ["spaces", "show"]])
@pytest.mark.parametrize("template", EVIL_YAML, ids=["apply-top", "apply-value", "new-popen"])
def test_yaml_tags_are_refused_and_not_executed(tmp_path, monkeypatch, command, template):
    import oscqat_cli

    marker = tmp_path / "YAML_PAYLOAD_RAN"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil.yaml").write_text(template.format(marker=marker))
    result = CliRunner().invoke(oscqat_cli.app, [*command, "evil.yaml"])
    assert result.exit_code == 2, result.output
    assert "not valid YAML" in result.output and "Traceback" not in result.output
    assert not marker.exists()
    assert sorted(os.listdir(tmp_path)) == ["evil.yaml"]


def test_yaml_is_only_read_with_safe_load():
    bad = re.compile(r"yaml\.(load|load_all|unsafe_load|unsafe_load_all|full_load|full_load_all)\(|"
                     r"Loader\s*=\s*yaml\.(Loader|UnsafeLoader|FullLoader)")
    offenders = [str(f.relative_to(ROOT)) for f in source_files(".py") if bad.search(f.read_text(errors="replace"))]
    assert not offenders, offenders


# ---------------------------------------------------------------------------- servers
# Servers the project could start in code with no safe default (``mlflow server``/``ui`` and
# ``optuna-dashboard`` default to 127.0.0.1, so for those the ``--host`` check above suffices).
SOCKET_SERVERS = re.compile(r"HTTPServer\(|socketserver\.|uvicorn\.run\(|serve_forever\(|\.bind\(\(|"
                            r"make_server\(|dashboard_host|ray start --head")


def test_no_code_binds_all_interfaces():
    files = source_files(".py", ".sh", include_tests=True)
    wildcard = [str(f.relative_to(ROOT)) for f in files if re.search(r"0\.0\.0\.0|\[::\]|\"::\"", f.read_text(errors="replace"))]
    assert not wildcard, f"binds every interface: {wildcard}"
    hosts = []
    for f in files:
        for m in re.finditer(r"--host[\"'=,\s]+([^\s\"',\]]+)", f.read_text(errors="replace")):
            hosts.append((str(f.relative_to(ROOT)), m.group(1)))
    assert all(h in ("127.0.0.1", "localhost") for _, h in hosts), hosts


def test_code_paths_that_start_servers_name_localhost():
    """Where code opens a listening socket itself, the same statement (+-3 lines) names 127.0.0.1."""
    found = []
    for f in source_files(".py", ".sh", include_tests=True):
        lines = f.read_text(errors="replace").splitlines()
        for i, line in enumerate(lines):
            if SOCKET_SERVERS.search(line) and not line.lstrip().startswith("#"):
                window = "\n".join(lines[max(0, i - 3):i + 4])
                found.append((str(f.relative_to(ROOT)), i + 1, "127.0.0.1" in window or "localhost" in window))
    assert all(ok for *_, ok in found), [x for x in found if not x[2]]


def test_server_clis_default_to_localhost():
    """``mlflow server`` binds 127.0.0.1 unless --host says otherwise (our docs and tests
    start them that way); this guards against an MLflow upgrade changing the default."""
    from mlflow.cli import server

    (host,) = [p.default for p in server.params if p.name == "host"]
    assert host == "127.0.0.1"


def test_ray_dashboard_is_not_started():
    import inspect

    from search import runner

    assert "include_dashboard=False" in inspect.getsource(runner.init_ray)


# ---------------------------------------------------------------------------- secrets
@pytest.mark.parametrize("text", [
    "postgresql://optuna:Sup3r-Secret@db.internal:5432/optuna",
    "mysql+pymysql://root:Sup3r-Secret@10.0.0.5/mlflow",
    "http://alice:Sup3r-Secret@mlflow.internal:5000",
    "s3://AKIAEXAMPLE:Sup3r-Secret@bucket/data",
    "see postgresql://u:Sup3r-Secret@h/db and https://v:Sup3r-Secret@h2",
])
def test_redact_hides_credentials_in_uris(text):
    from search.searcher import redact
    from search.tracking import safe_value

    assert "Sup3r-Secret" not in redact(text)
    assert ":***@" in redact(text)
    assert "Sup3r-Secret" not in safe_value("data_dir", text)


@pytest.mark.parametrize("uri, shown", [
    ("postgresql://user:Sup3r@Se/cret@db.example.com:5432/mlflow", "postgresql://user:***@db.example.com:5432/mlflow"),
    ("mysql://u:Sup/3r@Secret@h/db", "mysql://u:***@h/db"),
    ("http://u:Sup3r/Secret@host/a?x=1", "http://u:***@host/a?x=1"),
])
def test_redact_hides_a_password_holding_both_at_and_slash(uri, shown):
    """The password runs to the last '@' a host follows; the host and path stay readable."""
    from search.uris import redact

    assert redact(uri) == shown


@pytest.mark.parametrize("text", ["http://localhost:5000/runs/a@b.com/x", "sqlite:///tmp/a@b/mlflow.db",
                                  "file:///a:b/c@d/e"])
def test_redact_leaves_uris_without_credentials_alone(text):
    from search.uris import redact

    assert redact(text) == text


@pytest.mark.parametrize("key", ["password", "db_password", "api_key", "AWS_SECRET_ACCESS_KEY", "token",
                                 "access_key", "credentials"])
def test_secret_named_values_are_masked(key):
    from search.tracking import safe_value

    assert safe_value(key, "plain-value-123") == "***"


def test_backend_errors_redact_credentials(tmp_path, monkeypatch):
    """check_backends names the failing URI, with the password replaced (see test_backends.py too)."""
    from search.campaign import Campaign
    from search.runner import CampaignError, check_backends

    monkeypatch.chdir(tmp_path)
    camp = Campaign.model_validate({"name": "c", "targets": [{"arch": "demo_net", "bits": "w4a4"}],
                                    "optuna_storage": "postgresql://optuna:Sup3r-Secret@127.0.0.1:9/optuna"})
    with pytest.raises(CampaignError) as info:
        check_backends(camp)
    assert "Sup3r-Secret" not in str(info.value) and "optuna:***@127.0.0.1:9" in str(info.value)
