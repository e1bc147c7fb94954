"""Malformed campaign, space and train files are refused by the CLI before anything runs.

Each case runs one command (``oscqat search run``, ``oscqat spaces show`` or ``oscqat train``)
through typer's CliRunner (in-process: no Ray starts) with the working directory set to an empty
tmp dir that holds only the input file(s). Every case must exit 2 with a message naming the
field (or the file), print no traceback, and write nothing: no ``mlflow.db``, ``optuna.db``,
``ray_results`` or anything else appears in the directory.
"""

from __future__ import annotations

import os

import pytest
import yaml
from typer.testing import CliRunner

pytestmark = pytest.mark.timeout(120)

GARBAGE = bytes(range(256)) * 4 + b"\x00\xff\xfe\x80\x81"

# a campaign that is valid apart from what a case changes
CAMPAIGN = {"name": "bad", "targets": [{"arch": "demo_net", "bits": "w4a4"}],
            "base": {"batch_size": 128, "bn_reestimate_batches": 2}, "budget": {"num_samples": 2, "max_epochs": 2,
                                                                              "grace_period": 1,
                                                                              "allow_early_rungs": True},
            "confirm": None}
# a space file that is valid apart from what a case changes
SPACE = {"name": "s", "arch": "demo_net",
         "params": {"lr": {"type": "float", "low": 0.01, "high": 0.1, "log": True},
                    "method": {"type": "categorical", "choices": ["lsq", "dampen"]}},
         "bits": {"w4a4": {"starting_points": [{"name": "p", "lr": 0.05, "method": "lsq"}]}}}
TRAIN = {"arch": "demo_net", "bits": "w4a4", "dataset": "digits", "epochs": 1}


def camp(**changes):
    data = yaml.safe_load(yaml.safe_dump(CAMPAIGN))
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = data
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return yaml.safe_dump(data)


def space(**params):
    data = yaml.safe_load(yaml.safe_dump(SPACE))
    for k, v in params.items():
        if k in ("arch", "bits", "name", "extra"):
            data[k] = v
        else:
            data["params"][k] = v
    return yaml.safe_dump(data)


def train(**changes):
    return yaml.safe_dump({**TRAIN, **changes})


RUN, SHOW, TRAIN_CMD = ["search", "run"], ["spaces", "show"], ["train"]

# (id, command, file content (None: the file does not exist), words the message must contain)
CASES = [
    # ---- campaign files: oscqat search run
    ("camp-not-yaml", RUN, "name: [unclosed\ntargets: {", ["not valid YAML"]),
    ("camp-empty", RUN, "", ["file is empty"]),
    ("camp-binary", RUN, GARBAGE, ["not a text"]),
    ("camp-missing", RUN, None, ["file not found"]),
    ("camp-a-list", RUN, "- name: x\n- targets: []\n", ["expected a mapping"]),
    ("camp-unknown-key", RUN, camp(nmae="typo"), ["nmae", "unknown key"]),
    ("camp-wrong-type", RUN, camp(budget__num_samples="many"), ["budget.num_samples"]),
    ("camp-zero-samples", RUN, camp(budget__num_samples=0), ["budget.num_samples"]),
    ("camp-negative-epochs", RUN, camp(budget__max_epochs=-3), ["budget.max_epochs"]),
    ("camp-absurd-epochs", RUN, camp(budget__max_epochs=10**12), ["budget.max_epochs"]),
    ("camp-grace-over-max", RUN, camp(budget__grace_period=5), ["grace_period"]),
    ("camp-no-targets", RUN, camp(targets=[]), ["targets"]),
    ("camp-bits-1", RUN, camp(targets__0__bits="w1a1"), ["targets.0.bits", "between 2 and 8"]),
    ("camp-bits-9", RUN, camp(targets__0__bits="w9a9"), ["targets.0.bits", "between 2 and 8"]),
    ("camp-unknown-arch", RUN, camp(targets__0__arch="resnet9000"), ["targets.0.arch", "resnet9000"]),
    ("camp-unknown-dataset", RUN, camp(dataset="mnist"), ["dataset"]),
    ("camp-base-owned-key", RUN, camp(base__epochs=5), ["base", "epochs"]),
    ("camp-base-unknown-key", RUN, camp(base__learning_rate=0.1), ["base", "learning_rate"]),
    ("camp-base-wrong-type", RUN, camp(base__lr="fast"), ["lr"]),
    ("camp-base-absurd-lr", RUN, camp(base__lr=1e6), ["lr"]),
    ("camp-base-inverted-thresholds", RUN, camp(base__freeze_threshold_start=0.01, base__freeze_threshold_end=0.1),
     ["freeze_threshold_end: 0.1 must not exceed freeze_threshold_start (0.01)"]),
    ("camp-zero-cpu", RUN, camp(resources__cpu=0), ["resources.cpu"]),
    ("camp-zero-checkpoints", RUN, camp(checkpoints_to_keep=0), ["checkpoints_to_keep"]),
    ("camp-negative-failures", RUN, camp(max_failures=-1), ["max_failures"]),
    ("camp-zero-fp-epochs", RUN, camp(fp_pretrain__epochs=0), ["fp_pretrain.epochs"]),
    ("camp-bad-name", RUN, camp(name="../../etc"), ["name"]),
    ("camp-duplicate-targets", RUN, camp(targets=[{"arch": "demo_net", "bits": "w4a4"}] * 2), ["duplicated target"]),
    ("camp-fp32-target", RUN, camp(targets__0__bits="fp32"), ["targets.0.bits"]),
    ("camp-missing-pretrained", RUN, camp(targets__0__pretrained="nowhere/fp.pt"),
     ["targets[0] (demo_net/w4a4) with base: pretrained: 'nowhere/fp.pt' is neither a file"]),
    ("camp-missing-space", RUN, camp(space="no_such_space.yaml"), ["no_such_space.yaml", "file not found"]),
    ("camp-unknown-space-name", RUN, camp(space="mobilenet_v9"), ["mobilenet_v9", "no such space"]),
    # ---- space files: oscqat spaces show
    ("space-not-yaml", SHOW, "params: {lr: {type: float, low: [", ["not valid YAML"]),
    ("space-empty", SHOW, "", ["file is empty"]),
    ("space-binary", SHOW, GARBAGE, ["not a text"]),
    ("space-missing", SHOW, None, ["file not found"]),
    ("space-inverted-range", SHOW, space(lr={"type": "float", "low": 0.1, "high": 0.01}), ["lr"]),
    ("space-unknown-spec-key", SHOW, space(lr={"type": "float", "lo": 0.01, "high": 0.1}), ["lr", "lo"]),
    ("space-not-a-field", SHOW, space(learning_rate={"type": "float", "low": 0.01, "high": 0.1}),
     ["learning_rate", "not a TrainConfig field"]),
    ("space-bad-kind", SHOW, space(lr={"type": "floaty", "low": 0.01, "high": 0.1}), ["lr", "type"]),
    ("space-out-of-field-bounds", SHOW, space(lr={"type": "float", "low": 0.01, "high": 100.0}), ["lr"]),
    ("space-log-from-zero", SHOW, space(lr={"type": "float", "low": 0.0, "high": 0.1, "log": True}), ["lr"]),
    ("space-bits-1", SHOW, space(bits={"w1a1": {}}), ["w1a1", "between 2 and 8"]),
    ("space-bits-9", SHOW, space(bits={"w9a9": {}}), ["w9a9", "between 2 and 8"]),
    ("space-unknown-arch", SHOW, space(arch="resnet9000"), ["arch", "resnet9000"]),
    ("space-unknown-top-key", SHOW, space(extra=1), ["extra", "unknown key"]),
    ("space-searches-bits", SHOW, space(bits_={"type": "fixed", "value": "w4a4"}).replace("bits_", "bits"),
     ["bits"]),
    ("space-point-out-of-range", SHOW,
     space(bits={"w4a4": {"starting_points": [{"name": "p", "lr": 5.0, "method": "lsq"}]}}), ["lr", "p"]),
    # ---- train files: oscqat train
    ("train-not-yaml", TRAIN_CMD, "arch: demo_net\n  bits: : w4\n", ["not valid YAML"]),
    ("train-empty", TRAIN_CMD, "", ["file is empty"]),
    ("train-binary", TRAIN_CMD, GARBAGE, ["not a text"]),
    ("train-missing", TRAIN_CMD, None, ["file not found"]),
    ("train-a-string", TRAIN_CMD, "just a sentence\n", ["expected a mapping"]),
    ("train-unknown-key", TRAIN_CMD, train(epochz=3), ["epochz", "unknown key"]),
    ("train-wrong-type", TRAIN_CMD, train(epochs="ten"), ["epochs"]),
    ("train-zero-epochs", TRAIN_CMD, train(epochs=0), ["epochs"]),
    ("train-negative-batch", TRAIN_CMD, train(batch_size=-8), ["batch_size"]),
    ("train-absurd-epochs", TRAIN_CMD, train(epochs=10**12), ["epochs"]),
    ("train-bits-1", TRAIN_CMD, train(bits="w1a1"), ["bits", "between 2 and 8"]),
    ("train-bits-9", TRAIN_CMD, train(bits="w4a9"), ["bits", "between 2 and 8"]),
    ("train-unknown-arch", TRAIN_CMD, train(arch="vgg99"), ["arch", "vgg99"]),
    ("train-unknown-dataset", TRAIN_CMD, train(dataset="mnist"), ["dataset"]),
    ("train-negative-lr", TRAIN_CMD, train(lr=-0.1), ["lr"]),
    ("train-inverted-thresholds", TRAIN_CMD, train(freeze_threshold_start=0.01, freeze_threshold_end=0.5),
     ["freeze_threshold_end"]),
    ("train-val-fraction", TRAIN_CMD, train(val_fraction=1.5), ["val_fraction"]),
    ("train-missing-pretrained", TRAIN_CMD, train(pretrained="nowhere.pt"), ["pretrained: 'nowhere.pt' is neither a file"]),
    ("train-imagefolder-no-dir", TRAIN_CMD, train(dataset="imagefolder"), ["data_dir: required for dataset 'imagefolder'"]),
]
assert len(CASES) >= 25


@pytest.fixture(scope="module")
def cli():
    import oscqat_cli

    return CliRunner(), oscqat_cli.app


@pytest.mark.parametrize("case_id,command,content,expected", CASES, ids=[c[0] for c in CASES])
def test_malformed_input_is_refused(cli, tmp_path, monkeypatch, case_id, command, content, expected):
    runner, app = cli
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    name = f"{case_id}.yaml"
    if content is not None:
        path = tmp_path / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    before = sorted(os.listdir(tmp_path))
    result = runner.invoke(app, [*command, name])
    output = result.output
    flat = " ".join(output.split())
    assert result.exit_code == 2, f"exit {result.exit_code}, exception {result.exception!r}\n{output}"
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in output
    assert "error:" in output and "(top level)" not in output  # every message names its field
    for word in expected:
        assert word in flat, f"{word!r} not in message:\n{output}"
    assert sorted(os.listdir(tmp_path)) == before, "a refused input must not write anything"
