"""Search spaces: shipped files validate, samples stay in range and obey conditions, bad files are refused."""

from __future__ import annotations

import pickle
import textwrap
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from spaces import SpaceError, is_active, list_spaces, load_space, load_space_file

optuna.logging.set_verbosity(optuna.logging.WARNING)

SHIPPED = ["demo_net", "efficientnet_lite0", "mini_mobilenet_v2", "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small",
           "resnet18"]
REQUIRED_BITS = {"w2a2", "w3a3", "w4a4", "w4a8"}
REQUIRED_PARAMS = {"lr", "weight_decay", "quantizer_lr", "method", "dampen_lambda", "dampen_start",
                   "freeze_threshold_start", "freeze_threshold_end", "freeze_start", "osc_momentum"}
DAMPENS, FREEZES = {"dampen", "dampen+freeze"}, {"freeze", "dampen+freeze"}
TARGETS = [(name, bits) for name in SHIPPED for bits in sorted(REQUIRED_BITS)]


@pytest.fixture(scope="module")
def shipped():
    return {name: load_space_file(name) for name in SHIPPED}


# ------------------------------------------------------------------------------ shipped files
def test_every_architecture_ships_a_space():
    assert list_spaces() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_file_validates_for_every_bit_width(shipped, name):
    f = shipped[name]
    assert f.name == name and f.arch == name
    assert REQUIRED_BITS <= set(f.bits)
    for bits in f.bits:
        space = load_space(name, bits.upper())  # bit-width lookup ignores case
        assert space.bits == bits and space.name == name
        assert REQUIRED_PARAMS <= set(space.params)
        assert space.params["method"].choices == ["lsq", "dampen", "freeze", "dampen+freeze"]
        assert set(space.params["dampen_lambda"].when["method"]) == DAMPENS
        for p in ("freeze_threshold_start", "freeze_threshold_end", "osc_momentum", "freeze_start"):
            assert set(space.params[p].when["method"]) == FREEZES
        # every campaign measures the plain-LSQ baseline it must beat
        assert "lsq-baseline" in space.starting_point_names
        assert space.starting_point("lsq-baseline")["method"] == "lsq"
        assert len(space.starting_points) == len(space.starting_point_names) >= 3


def test_paper_recipes_are_starting_points(shipped):
    mb2 = {b: shipped["mobilenet_v2"].resolve(b) for b in ("w4a4", "w3a3")}
    assert mb2["w4a4"].starting_point("paper-freeze") == {
        "lr": 0.0033, "weight_decay": 5e-5, "quantizer_lr": 1e-5, "method": "freeze", "freeze_threshold_start": 0.1,
        "freeze_threshold_end": 0.01, "freeze_start": 0.25, "osc_momentum": 1e-3}
    assert mb2["w4a4"].starting_point("paper-dampen") == {
        "lr": 0.0033, "weight_decay": 2.5e-5, "quantizer_lr": 1e-5, "method": "dampen", "dampen_lambda": 0.1,
        "dampen_start": 0.25, "dampen_aggregation": "kernel_mean"}
    assert mb2["w3a3"].starting_point("paper-freeze")["lr"] == 0.01
    assert mb2["w3a3"].starting_point("paper-freeze")["freeze_threshold_end"] == 0.011
    eff = shipped["efficientnet_lite0"]
    assert eff.resolve("w4a4").starting_point("paper-dampen")["weight_decay"] == 1e-4
    assert eff.resolve("w3a3").starting_point("paper-freeze")["weight_decay"] == 5e-5
    # lower bit-widths search higher learning rates
    for name in SHIPPED:
        f = shipped[name]
        assert f.resolve("w3a3").params["lr"].high >= f.resolve("w4a4").params["lr"].high


def test_demo_ranges_suit_a_few_hundred_steps(shipped):
    demo = shipped["demo_net"].resolve("w3a3").params
    assert demo["osc_momentum"].low >= 1e-3 and demo["osc_momentum"].high <= 3e-2
    # quantizer lr: measured to keep integer flips weight-driven (scale_flip_frac, see the header)
    assert 1e-7 <= demo["quantizer_lr"].low and demo["quantizer_lr"].high <= 3e-5
    space = shipped["demo_net"]
    for bits, point in (("w4a4", 1e-6), ("w3a3", 3e-6), ("w2a2", 1e-5), ("w4a8", 1e-6)):
        resolved = space.resolve(bits)
        assert all(p["quantizer_lr"] == point for p in resolved.starting_points), bits
        assert resolved.params["quantizer_lr"].high < 1e-3  # 8-bit scales are ~1e-3: Adam must not cross 0
    assert 0.005 <= demo["lr"].low and demo["lr"].high <= 0.2


@pytest.mark.parametrize("name,bits", TARGETS)
def test_starting_points_make_valid_train_configs(shipped, name, bits):
    space = shipped[name].resolve(bits)
    for label, point in zip(space.starting_point_names, space.starting_points):
        cfg = space.to_train_config(point, base={"epochs": 3, "dataset": "synthetic"})
        assert (cfg.arch, cfg.bits, cfg.method, cfg.epochs) == (name, bits, point["method"], 3), label
        assert cfg.freeze_threshold_end <= cfg.freeze_threshold_start
        assert space.check_point(point) == point


# ------------------------------------------------------------------------------ sampling
def _check_sample(space, trial_params: dict, fixed: dict) -> None:
    values = {**trial_params, **fixed}
    seen: dict = {}
    for name, spec in space.params.items():
        active = is_active(spec, seen)
        assert (name in values) == active, f"{name} present={name in values} but active={active}"
        if active:
            assert spec.problem(values[name]) is None, (name, values[name])
            assert (name in fixed) == (not spec.sampled)
            seen[name] = values[name]
    assert set(values) == set(seen)


@pytest.mark.parametrize("name,bits", TARGETS)
def test_200_seeded_samples_stay_in_range_and_respect_conditions(shipped, name, bits):
    space = shipped[name].resolve(bits)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=7), direction="maximize")
    methods = set()
    for _ in range(200):
        trial = study.ask()
        fixed = space.define_by_run(trial)
        _check_sample(space, trial.params, fixed)
        method = trial.params["method"]
        methods.add(method)
        assert ("dampen_lambda" in trial.params) == (method in DAMPENS)
        assert ("freeze_threshold_end" in trial.params) == (method in FREEZES)
        assert ("dampen_aggregation" in fixed) == (method in DAMPENS)
        cfg = space.to_train_config({**trial.params, **fixed})  # never violates end <= start
        assert cfg.freeze_threshold_end <= cfg.freeze_threshold_start
        study.tell(trial, cfg.lr)
    assert methods == {"lsq", "dampen", "freeze", "dampen+freeze"}  # both sides of every condition seen


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_tpe_with_enqueued_starting_points(shipped):
    """The searcher set-up of DESIGN.md: seeded multivariate TPE, starting points enqueued first."""
    space = shipped["demo_net"].resolve("w3a3")
    sampler = optuna.samplers.TPESampler(seed=0, multivariate=True, group=True, constant_liar=True)
    study = optuna.create_study(sampler=sampler, direction="maximize")
    for point in space.starting_points:
        study.enqueue_trial(point)  # fixed keys are ignored by Optuna
    for i in range(30):
        trial = study.ask()
        values = space.sample(trial)
        if i < len(space.starting_points):
            assert values == space.starting_points[i]
        _check_sample(space, trial.params, space.define_by_run(trial))
        study.tell(trial, values["lr"])
    # same seed, same suggestions: a campaign can be reproduced
    again = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, multivariate=True, group=True,
                                                                   constant_liar=True), direction="maximize")
    for point in space.starting_points:
        again.enqueue_trial(point)
    for trial in study.trials:
        t = again.ask()
        space.define_by_run(t)
        assert t.params == trial.params
        again.tell(t, trial.value)


def test_define_by_run_is_picklable_for_searcher_checkpoints(shipped):
    space = shipped["mobilenet_v2"].resolve("w4a4")
    clone = pickle.loads(pickle.dumps(space.define_by_run))
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1)).ask()
    fixed = clone(trial)
    _check_sample(space, trial.params, fixed)


# ------------------------------------------------------------------------------ user files
GOOD = """\
name: tiny
arch: demo_net
params:
  lr: {type: float, low: 0.01, high: 0.1, log: true}
  method: {type: categorical, choices: [lsq, dampen, freeze]}
  dampen_lambda: {type: float, low: 0.01, high: 1.0, when: {method: dampen}}
  freeze_threshold_start: {type: float, low: 0.05, high: 0.2, when: {method: [freeze]}}
  freeze_threshold_end: {type: float, low: 0.005, high: 0.05, when: {method: [freeze]}}
  batch_size: {type: int, low: 32, high: 128, step: 32}
  momentum: {type: fixed, value: 0.9}
bits:
  w4a4:
    params:
      lr: {low: 0.005}
    starting_points:
      - {name: base, lr: 0.05, method: lsq, batch_size: 64}
  w3a3:
    starting_points:
      - {name: damp, lr: 1e-2, method: dampen, dampen_lambda: 0.1, batch_size: 32, momentum: 0.9}
"""


def write(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_user_file_by_path(tmp_path):
    path = write(tmp_path, GOOD)
    f = load_space_file(path)
    assert f.name == "tiny" and f.bits == ["w4a4", "w3a3"]
    w4 = load_space(str(path), "w4a4")
    assert (w4.params["lr"].low, w4.params["lr"].high, w4.params["lr"].log) == (0.005, 0.1, True)  # merged
    assert w4.starting_points == [{"lr": 0.05, "method": "lsq", "batch_size": 64, "momentum": 0.9}]
    w3 = f.resolve("w3a3")
    assert w3.starting_points[0]["lr"] == 0.01  # YAML 1.1 reads 1e-2 as a string; coerced to float
    assert w3.starting_point_names == ["damp"]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(50):
        trial = study.ask()
        fixed = w3.define_by_run(trial)
        assert fixed == {"momentum": 0.9}
        assert trial.params["batch_size"] in (32, 64, 96, 128)
        _check_sample(w3, trial.params, fixed)
        study.tell(trial, 0.0)


def test_overrides_replace_remove_and_add(tmp_path):
    overrides = """  w3a3:
    params:
      method: {type: fixed, value: dampen}
      freeze_threshold_start: null
      freeze_threshold_end: null
      weight_decay: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}
    starting_points:
      - {name: damp, lr: 1e-2, method: dampen, dampen_lambda: 0.1, batch_size: 32, weight_decay: 1.0e-4}
"""
    text = GOOD[:GOOD.index("  w3a3:")] + overrides
    w3 = load_space(write(tmp_path, text), "w3a3")
    assert list(w3.params) == ["lr", "method", "dampen_lambda", "batch_size", "momentum", "weight_decay"]
    assert w3.params["method"].type == "fixed"
    assert w3.starting_points[0] == {"lr": 0.01, "method": "dampen", "dampen_lambda": 0.1, "batch_size": 32,
                                     "momentum": 0.9, "weight_decay": 1e-4}
    with pytest.raises(SpaceError, match="starting point 'damp': parameter 'weight_decay' is missing"):
        load_space(write(tmp_path, text.replace(", weight_decay: 1.0e-4}", "}")), "w3a3")
    with pytest.raises(SpaceError, match="parameter 'foo': cannot remove it"):
        load_space(write(tmp_path, text.replace("      freeze_threshold_end: null", "      foo: null")), "w3a3")


def test_condition_shorthand_and_inactive_point_values(tmp_path):
    space = load_space(write(tmp_path, GOOD), "w4a4")
    assert space.params["dampen_lambda"].when == {"method": ["dampen"]}
    with pytest.raises(SpaceError, match="'dampen_lambda' is inactive"):
        space.check_point({"lr": 0.05, "method": "lsq", "batch_size": 64, "dampen_lambda": 0.1})
    with pytest.raises(SpaceError, match="'batch_size' is missing"):
        space.check_point({"lr": 0.05, "method": "lsq"})


def test_to_train_config_refuses_other_bits_or_arch(tmp_path):
    space = load_space(write(tmp_path, GOOD), "w4a4")
    point = space.starting_points[0]
    assert space.to_train_config(point, base={"bits": "W4A4"}).bits == "w4a4"
    with pytest.raises(SpaceError, match="bits 'w3a3'"):
        space.to_train_config(point, base={"bits": "w3a3"})
    with pytest.raises(SpaceError, match="arch 'resnet18'"):
        space.to_train_config(point, base={"arch": "resnet18"})
    with pytest.raises(SpaceError, match="epochs"):
        space.to_train_config(point, base={"epochs": 0})


BAD_CASES = {
    "low_not_below_high": (("lr: {type: float, low: 0.01, high: 0.1, log: true}",
                            "lr: {type: float, low: 0.1, high: 0.1, log: true}"), r"parameter 'lr'.*low \(0.1\) must be less than high"),
    "log_low_not_positive": (("lr: {type: float, low: 0.01, high: 0.1, log: true}",
                              "lr: {type: float, low: 0.0, high: 0.1, log: true}"), r"parameter 'lr'.*log range needs low > 0"),
    "unknown_field": (("momentum: {type: fixed", "learning_rat: {type: fixed"),
                      r"parameter 'learning_rat': not a TrainConfig field"),
    "reserved_field": (("momentum: {type: fixed, value: 0.9}", "bits: {type: fixed, value: w4a4}"),
                       r"parameter 'bits': cannot be searched"),
    "point_out_of_range": (("{name: base, lr: 0.05,", "{name: base, lr: 0.5,"),
                           r"bits w4a4: starting point 'base': parameter 'lr': 0.5 is outside \[0.005, 0.1\]"),
    "point_unknown_param": (("{name: base, lr: 0.05,", "{name: base, lr: 0.05, lrr: 1,"),
                            r"starting point 'base': unknown parameter 'lrr'"),
    "point_bad_choice": (("{name: base, lr: 0.05, method: lsq,", "{name: base, lr: 0.05, method: freez,"),
                         r"starting point 'base': parameter 'method': .*freez"),
    "point_off_step_grid": (("method: lsq, batch_size: 64}", "method: lsq, batch_size: 48}"),
                            r"parameter 'batch_size': 48 is not on the grid"),
    "point_without_name": (("{name: base, lr", "{lr"), r"starting point #1: needs a 'name:'"),
    "condition_unknown_param": (("when: {method: dampen}", "when: {methd: dampen}"),
                                r"parameter 'dampen_lambda': condition on 'methd': unknown parameter"),
    "condition_on_later_param": (("when: {method: dampen}", "when: {momentum: 0.9}"),
                                 r"condition on 'momentum': 'momentum' must be declared before 'dampen_lambda'"),
    "condition_never_true": (("when: {method: dampen}", "when: {method: dampen+freeze}"),
                             r"parameter 'dampen_lambda': condition on 'method'.*never be sampled"),
    "condition_on_float": (("when: {method: dampen}", "when: {lr: 0.1}"),
                           r"condition on 'lr': conditions can only test categorical or fixed"),
    "unknown_spec_key": (("low: 0.01, high: 0.1, log: true}", "lo: 0.01, high: 0.1, log: true}"),
                         r"parameter 'lr': .*unknown key 'lo'"),
    "unknown_kind": (("{type: categorical, choices: [lsq", "{type: choice, choices: [lsq"),
                     r"parameter 'method': type must be one of float, int, categorical, fixed"),
    "kind_misfits_field": (("method: {type: categorical, choices: [lsq, dampen, freeze]}",
                            "method: {type: float, low: 0.1, high: 0.2}"), r"parameter 'method': type 'float' does not fit"),
    "range_beyond_field": (("momentum: {type: fixed, value: 0.9}", "dampen_start: {type: float, low: 0.2, high: 1.0}"),
                           r"parameter 'dampen_start': 1 is not valid for TrainConfig.dampen_start"),
    "unknown_top_key": (("arch: demo_net", "arch: demo_net\nbit: {}"), r"bit: unknown key"),
    "bad_bits_key": (("  w3a3:\n", "  w9a9:\n"), r"bit-width 'w9a9'.*between 2 and 8"),
    "unknown_arch": (("arch: demo_net", "arch: mobilenet_v9"), r"arch 'mobilenet_v9' is not a known model"),
    "freeze_ranges_overlap": (("freeze_threshold_end: {type: float, low: 0.005, high: 0.05",
                               "freeze_threshold_end: {type: float, low: 0.005, high: 0.08"),
                              r"'freeze_threshold_end' and 'freeze_threshold_start'.*can reach 0.08"),
    "freeze_end_vs_default_start": ((("  freeze_threshold_start: {type: float, low: 0.05, high: 0.2, when: {method: [freeze]}}\n", ""),
                                     ("low: 0.005, high: 0.05", "low: 0.005, high: 0.15")),
                                    r"'freeze_threshold_end' and 'freeze_threshold_start': freeze_threshold_end can reach "
                                    r"0.15 while freeze_threshold_start can be as low as 0.1"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_space_is_refused_with_its_message(tmp_path, case):
    edits, pattern = BAD_CASES[case]
    text = GOOD
    for old, new in (edits,) if isinstance(edits[0], str) else edits:
        assert old in text, f"case {case}: {old!r} not in the file"
        text = text.replace(old, new, 1)
    path = write(tmp_path, text)
    with pytest.raises(SpaceError, match=pattern) as info:
        load_space_file(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_unknown_bit_width_lists_the_available_ones(tmp_path):
    path = write(tmp_path, GOOD)
    with pytest.raises(SpaceError, match=r"no bit-width 'w2a2'.*available: w4a4, w3a3") as info:
        load_space(path, "w2a2")
    assert str(path) in str(info.value)
    with pytest.raises(SpaceError, match="available: w4a4, w3a3, w2a2, w4a8"):
        load_space("mobilenet_v2", "w5a5")


@pytest.mark.parametrize("content,pattern", [
    (None, "file not found"),
    ("", "file is empty"),
    ("params: [unclosed\n", "not valid YAML"),
    ("- a\n- b\n", "expected a mapping"),
    ("name: x\n", r"params: Field required"),
    ("params: {lr: 0.1}\nbits: {w4a4: {}}\n", r"parameter 'lr': needs a mapping with 'type:'"),
])
def test_unreadable_files_are_refused(tmp_path, content, pattern):
    path = tmp_path / "s.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SpaceError, match=pattern) as info:
        load_space_file(path)
    assert str(path) in str(info.value)


def test_unknown_space_name_suggests_a_close_one():
    with pytest.raises(SpaceError, match="did you mean 'mobilenet_v2'"):
        load_space("mobilenet_v22", "w4a4")


def test_invalid_starting_point_train_config_is_refused(tmp_path):
    text = GOOD.replace("momentum: {type: fixed, value: 0.9}", "pretrained: {type: fixed, value: /no/such/file.pt}")
    text = text.replace(", momentum: 0.9}", "}")
    with pytest.raises(SpaceError, match=r"(?s)bits w4a4: starting point 'base' is not a valid TrainConfig:\n.*pretrained: '/no/such/file.pt'"):
        load_space_file(write(tmp_path, text))


# ------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def runner():
    return CliRunner()


def _app():
    from oscqat_cli import app

    return app


def test_cli_list(runner):
    result = runner.invoke(_app(), ["spaces", "list"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in SHIPPED:
        assert name in result.stdout
    assert "w4a8" in result.stdout and "dampen_lambda" in result.stdout


def test_cli_show_tables_and_json(runner):
    import json

    result = runner.invoke(_app(), ["spaces", "show", "mobilenet_v2", "--bits", "w3a3"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "paper-freeze" in result.stdout and "freeze_threshold_end" in result.stdout and "0.011" in result.stdout
    result = runner.invoke(_app(), ["spaces", "show", "mobilenet_v2", "--bits", "w3a3", "--json"])
    data = json.loads(result.stdout)
    assert data["bits"] == "w3a3" and data["params"]["lr"].items() >= {"type": "float", "low": 0.003, "high": 0.03, "log": True}.items()
    assert [p["name"] for p in data["starting_points"]] == ["lsq-baseline", "paper-dampen", "paper-freeze"]
    result = runner.invoke(_app(), ["spaces", "show", "demo_net", "--json"])
    assert [d["bits"] for d in json.loads(result.stdout)] == ["w4a4", "w3a3", "w2a2", "w4a8"]


@pytest.mark.parametrize("args", [["show", "{path}"], ["show", "demo_net", "--bits", "w5a5"], ["show", "no_such_space"]])
def test_cli_bad_space_exits_2_without_traceback(runner, tmp_path, args):
    path = write(tmp_path, GOOD.replace("low: 0.01, high: 0.1, log: true", "low: 0.5, high: 0.1, log: true"))
    result = runner.invoke(_app(), ["spaces", *(a.format(path=path) for a in args)], env={"COLUMNS": "300"})
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith("error:") and "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
