"""``oscqat train``: JSON output and user-facing config errors (exit 2, field named, no traceback)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from oscqat_helpers import DEMO_CONFIG, tiny_train_kwargs
from oscqat.trainer import METRIC_NAMES
from oscqat_cli import app

runner = CliRunner()


def _write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _config(tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load(DEMO_CONFIG.read_text())
    data.update(changes)
    return _write(tmp_path, yaml.safe_dump(data))


def test_train_demo_json(tmp_path):
    result = runner.invoke(app, ["train", str(DEMO_CONFIG), "--epochs", "1", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)  # stdout holds exactly one JSON document
    assert set(payload) == {"epochs", "final", "out"}
    assert (Path(payload["out"]) / "model.pt").is_file()  # every run keeps its model, --out or not
    assert len(payload["epochs"]) == 1
    assert payload["final"] == payload["epochs"][-1]
    assert set(payload["final"]) == set(METRIC_NAMES)
    assert payload["final"]["epoch"] == 1
    assert 0.0 <= payload["final"]["val_top1"] <= 1.0
    assert payload["final"]["val_top1"] > 0.3  # W3A3 after one epoch: far above chance (0.1)


def test_train_out_dir_writes_artifacts_and_resumes(tmp_path):
    cfg = _write(tmp_path, yaml.safe_dump(tiny_train_kwargs(epochs=1, bn_reestimate_batches=2)))
    out = tmp_path / "out"
    result = runner.invoke(app, ["train", str(cfg), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    for name in ("checkpoint.pt", "model.pt", "metrics.json", "config.yaml"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 1
    # a second call with more epochs resumes from the checkpoint instead of starting over
    result = runner.invoke(app, ["train", str(cfg), "--out", str(out), "--epochs", "2", "--json"])
    assert result.exit_code == 0, result.output
    epochs = json.loads(result.stdout)["epochs"]
    assert [m["epoch"] for m in epochs] == [1, 2]
    assert epochs[0]["val_top1"] == metrics["epochs"][0]["val_top1"]


BAD_CONFIGS = [
    ({"arch": "vgg16"}, "arch"),
    ({"bits": "w1a1"}, "bits"),
    ({"bits": "w9a9"}, "bits"),
    ({"bits": "int4"}, "bits"),
    ({"dataset": "imagefolder"}, "data_dir"),
    ({"dataset": "imagefolder", "data_dir": "/nonexistent/imagenet"}, "data_dir"),
    ({"dampen_lambda": -0.1}, "dampen_lambda"),
    ({"freeze_threshold_start": 0.01, "freeze_threshold_end": 0.05}, "freeze_threshold_end"),
    ({"lr": 0.0}, "lr"),
    ({"batch_size": 0}, "batch_size"),
    ({"dampen_lamda": 0.1}, "dampen_lamda"),  # typo: unknown key
    ({"pretrained": "/nonexistent/fp.pt"}, "pretrained"),
]


@pytest.mark.parametrize("changes,field", BAD_CONFIGS, ids=[f for _, f in BAD_CONFIGS])
def test_invalid_config_exits_2_naming_the_field(tmp_path, changes, field):
    path = _config(tmp_path, **changes)
    result = runner.invoke(app, ["train", str(path), "--epochs", "1", "--json"])
    assert result.exit_code == 2, result.output
    assert field in result.stderr, result.stderr
    assert "Traceback" not in result.output
    assert result.stdout == ""  # nothing half-written on stdout
    assert isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("text,needle", [
    ("", "empty"),
    ("# only a comment\n", "empty"),
    ("arch: [demo_net\nbits: : w4\n", "YAML"),
    ("- arch\n- bits\n", "mapping"),
    ("just a string\n", "mapping"),
])
def test_unreadable_config_exits_2(tmp_path, text, needle):
    path = _write(tmp_path, text)
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 2, result.output
    assert needle in result.stderr, result.stderr
    assert "Traceback" not in result.output


def test_missing_config_file_exits_2(tmp_path):
    result = runner.invoke(app, ["train", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "not found" in result.stderr and "Traceback" not in result.output


def test_diverging_run_fails_cleanly(tmp_path):
    cfg = _write(tmp_path, yaml.safe_dump(tiny_train_kwargs(
        bits="w4a4", lr=10.0, weight_decay=1.0, momentum=0.9, batch_size=16, epochs=1, lr_schedule="constant")))
    result = runner.invoke(app, ["train", str(cfg), "--json"])
    assert result.exit_code == 1, result.output
    assert "non-finite" in result.stderr
    assert "Traceback" not in result.output


def test_cli_starts_without_torch_and_the_package_exports_resolve():
    """``oscqat --help`` and config-only commands must not pay torch's import (~3 s); the public
    names still resolve on first use."""
    import subprocess
    import sys

    code = ("import sys, oscqat_cli, oscqat; assert 'torch' not in sys.modules, 'torch imported at start-up'; "
            "names = [getattr(oscqat, n) for n in oscqat.__all__]; assert 'torch' in sys.modules; "
            "assert oscqat.Trainer.__module__ == 'oscqat.trainer'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_submodules_resolve_after_a_plain_import():
    import subprocess
    import sys

    code = ("import oscqat\nassert oscqat.layers.QuantMixin is oscqat.QuantMixin\n"
            "try:\n    oscqat.no_such_thing\nexcept AttributeError:\n    pass\nelse:\n    raise SystemExit(1)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_collapsed_quantizer_fails_naming_the_layer(tmp_path):
    cfg = _config(tmp_path, quantizer_lr=0.05, epochs=2)
    result = runner.invoke(app, ["train", str(cfg), "--json"])
    assert result.exit_code == 1, result.output
    assert "collapsed" in result.stderr and "classifier." in result.stderr and "_quantizer" in result.stderr
    assert "Traceback" not in result.output
    assert result.stdout == ""  # no half-written JSON


def _history(epochs: int = 3) -> list[dict]:
    return [{"epoch": e, "train_loss": 1.84321 / e, "val_loss": 1.04812 / e, "val_top1": 0.84375 + e / 100,
             "val_top1_no_bnre": 0.13194 * e, "osc_frac": 0.00083 / e, "frozen_frac": 0.0118 * e,
             "dampen_lambda": 0.0201 * e, "freeze_threshold": 0.0821 / e, "epoch_time_s": 21.04 + e}
            for e in range(1, epochs + 1)]


@pytest.mark.parametrize("width", [80, 60, 40])
def test_results_table_fits_the_terminal_and_never_cuts_a_number(width):
    from rich.console import Console

    from oscqat.cli import results_table

    history = _history()
    console = Console(width=width, record=True, file=open("/dev/null", "w"))
    console.print(results_table(history, width))
    text = console.export_text()
    assert all(len(line) <= width for line in text.splitlines()), text
    assert "…" not in text
    for m in history:  # the columns that always stay, in full
        assert f"{m['val_top1']:.4f}" in text
    if width == 80:  # at 80 columns only the epoch time has to go, and the caption says so
        for m in history:
            for key, fmt in (("val_top1_no_bnre", ".4f"), ("osc_frac", ".4f"), ("frozen_frac", ".4f"),
                             ("train_loss", ".3f"), ("val_loss", ".3f")):
                assert format(m[key], fmt) in text, key
        assert "not shown at 80 columns: s" in " ".join(text.split())
    else:
        assert f"not shown at {width} columns:" in " ".join(text.split())


def test_train_table_in_an_80_column_terminal(tmp_path):
    cfg = _write(tmp_path, yaml.safe_dump(tiny_train_kwargs(epochs=1, bn_reestimate_batches=2)))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["train", str(cfg), "--out", str(out)], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    final = json.loads((out / "metrics.json").read_text())["epochs"][-1]
    lines = result.stdout.split("model:", 1)[0].splitlines()  # the table and its caption (paths are soft-wrapped)
    assert len(lines) >= 6 and all(len(line) <= 80 for line in lines), result.stdout
    assert "…" not in result.stdout
    assert f"{final['val_top1']:.4f}" in result.stdout and f"{final['train_loss']:.3f}" in result.stdout
