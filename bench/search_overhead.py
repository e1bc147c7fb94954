"""Benchmark: what the search machinery (Ray Tune + Optuna + MLflow) costs on top of plain training.

The same N trials (demo net on digits, W3A3, random sampler, FIFO scheduler so every trial trains its
full budget, a fixed pretrained FP checkpoint so no FP pretraining) run three ways, interleaved over
rounds so machine noise hits all of them alike:

  * ``tune_c1``: ``search.runner.run_campaign`` in-process, ``max_concurrent_trials: 1``, 1 CPU/trial;
  * ``loop``:    the same TrainConfigs (read back from the campaign's Optuna study, cross-checked
                 against its MLflow params) trained one after another by a plain loop over
                 ``oscqat.Trainer`` in this process, ``torch.set_num_threads(1)``;
  * ``tune_c2``: the same campaign with ``max_concurrent_trials: 2`` (2 x 1 CPU on a 2-core machine);
  * ``loop_x2``:  the plain loop split over 2 processes (1 thread each), started together: the speed-up
                 this machine itself gives 2 concurrent 1-thread trainings (the ceiling for tune_c2);
  * ``tune_c1_reuse`` (only with ``--with-reuse``): ``tune_c1`` with ``TuneConfig(reuse_actors=True)``
                 forced; since 2026-11-27 the runner sets it itself, so this now equals ``tune_c1``.

Ratios: ``tune_c1 / loop`` (search overhead; target <= 1.10 for trials of >= 30 s each) and
``tune_c1 / tune_c2`` (speed-up of 2 concurrent 1-CPU trials; target >= 1.7). Ray is started once
(``ray.init(num_cpus=2)``) before the rounds; its start-up time is reported separately. A probe
trial checks how many torch threads a 1-CPU trial really gets.

    .venv/bin/python bench/search_overhead.py [--trials 4] [--epochs 32] [--rounds 2] [--json FILE]
    .venv/bin/python bench/search_overhead.py --quick      # smoke run: tiny trials, targets do not apply
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import cpu_model, loadavg, say  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

TARGET_OVERHEAD = 1.10
TARGET_SPEEDUP = 1.7
MIN_TRIAL_S = 30.0
ARCH, BITS = "demo_net", "w3a3"
BASE = {"batch_size": 64, "bn_reestimate_batches": 10}


@contextlib.contextmanager
def logged_to(path: Path):
    """Send Tune's/Ray's console output for one run to a file (the benchmark prints its own lines)."""
    with open(path, "w") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        yield


# setup ---------------------------------------------------------------------------------------
def start_ray(work: Path) -> float:
    """A private local Ray with 2 CPUs (never attaches to a cluster somebody else runs here)."""
    os.environ.pop("RAY_ADDRESS", None)
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="oqb", dir="/tmp")  # short: socket paths <= 107 chars
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")  # as search.runner.init_ray does
    import logging

    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True, configure_logging=True,
             logging_level=logging.WARNING)
    return time.perf_counter() - t0


def make_fp_checkpoint(path: Path, epochs: int) -> Path:
    """A float demo-net checkpoint (the campaign's `pretrained`): no FP pretraining inside the campaign."""
    from oscqat import TrainConfig, Trainer

    cfg = TrainConfig(arch=ARCH, bits="fp32", dataset="digits", epochs=epochs, lr=0.05, weight_decay=5e-4, seed=0,
                      bn_reestimate_batches=0, device="cpu", batch_size=64)
    trainer = Trainer(cfg)
    trainer.fit()
    return trainer.save_model(path)


def thread_probe(work: Path) -> dict:
    """Run one 1-CPU Tune trial that calls the project's ``_set_threads`` and reports what it got."""
    from ray import tune

    def probe(config):
        import os as _os

        import torch as _torch

        before = _torch.get_num_threads()
        from search.trainable import _set_threads

        _set_threads()
        tune.report({"omp_env": _os.environ.get("OMP_NUM_THREADS", "unset"), "threads_before": before,
                     "threads_after": _torch.get_num_threads(), "interop": _torch.get_num_interop_threads()})

    tuner = tune.Tuner(tune.with_resources(probe, {"cpu": 1, "gpu": 0}),
                       run_config=tune.RunConfig(name="probe", storage_path=str(work / "probe"), verbose=0))
    with logged_to(work / "probe.log"):
        grid = tuner.fit()
    m = grid[0].metrics
    return {k: m[k] for k in ("omp_env", "threads_before", "threads_after", "interop")}


def campaign_dict(name: str, work: Path, fp: Path, trials: int, epochs: int, concurrency: int) -> dict:
    d = work / name
    return {
        "name": name, "dataset": "digits",
        "targets": [{"arch": ARCH, "bits": BITS, "pretrained": str(fp)}],
        "base": dict(BASE),
        "confirm": None,
        "budget": {"num_samples": trials, "max_epochs": epochs, "grace_period": 1, "allow_early_rungs": True, "searcher": "random",
                   "scheduler": "fifo", "enqueue_starting_points": False},
        "resources": {"cpu": 1, "gpu": 0}, "max_concurrent_trials": concurrency, "seed": 0,
        "storage_path": str(d / "ray_results"), "mlflow": {"tracking_uri": f"sqlite:///{d}/mlflow.db"},
        "optuna_storage": f"sqlite:///{d}/optuna.db",
    }


# the three variants ------------------------------------------------------------------------------
def run_tune(name: str, work: Path, fp: Path, trials: int, epochs: int, concurrency: int,
             reuse_actors: bool = False) -> dict:
    from ray import tune

    from search.campaign import Campaign
    from search.runner import run_campaign

    campaign = Campaign.model_validate(campaign_dict(name, work, fp, trials, epochs, concurrency))
    (work / name).mkdir(parents=True, exist_ok=True)
    fit_s = _time_tuner_fit()
    original_config = tune.TuneConfig
    if reuse_actors:
        tune.TuneConfig = lambda *a, **kw: original_config(*a, **{"reuse_actors": True, **kw})
    t0 = time.perf_counter()
    try:
        with logged_to(work / f"{name}.log"):
            results = run_campaign(campaign)
    finally:
        tune.TuneConfig = original_config
    wall = time.perf_counter() - t0
    counts = results[0].counts
    if counts.get("COMPLETE", 0) != trials:
        raise RuntimeError(f"{name}: expected {trials} COMPLETE trials, got {counts} (log: {work / name}.log)")
    configs, spans, epoch_sums = read_back(campaign, fp)
    return {"wall_s": wall, "tuner_fit_s": sum(fit_s), "configs": configs, "trial_span_s": spans,
            "trial_epoch_time_s": epoch_sums}


_FIT_TIMES: list[float] = []


def _time_tuner_fit() -> list[float]:
    """Time ``Tuner.fit`` inside the runner (set-up before it and summaries after it are the rest)."""
    from ray import tune

    if not getattr(tune.Tuner.fit, "_bench_timed", False):
        original = tune.Tuner.fit

        def fit(self, *a, **kw):
            t0 = time.perf_counter()
            try:
                return original(self, *a, **kw)
            finally:
                _FIT_TIMES.append(time.perf_counter() - t0)

        fit._bench_timed = True
        tune.Tuner.fit = fit
    _FIT_TIMES.clear()
    return _FIT_TIMES


def read_back(campaign, fp: Path) -> tuple[list[dict], list[float], list[float]]:
    """The trials' TrainConfigs (Optuna params + the space's fixed params, on the runner's base config),
    checked against the MLflow child runs' params; plus each trial's MLflow run span and epoch-time sum."""
    import optuna
    from optuna.trial import FixedTrial

    from oscqat.config import TrainConfig
    from search.searcher import TRIAL_ID_ATTR, make_storage
    from search.tracking import TAG, client_for, safe_value
    from spaces import load_space

    target = campaign.targets[0]
    space = load_space(campaign.space_for(target), target.bits)
    study = optuna.load_study(study_name=campaign.study_name(target), storage=make_storage(campaign.optuna_storage))
    base = campaign.trial_config(target, {}, str(fp))
    client = client_for(campaign.mlflow.tracking_uri)
    exp = client.get_experiment_by_name(campaign.experiment_name)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG}role` = 'trial'", max_results=1000)
    by_tid = {r.data.tags[f"{TAG}trial_id"]: r for r in runs}
    configs, spans, epoch_sums = [], [], []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        params = {**t.params, **space.define_by_run(FixedTrial(dict(t.params)))}
        cfg = TrainConfig.model_validate({**base, **params, "pretrained": None})  # exactly as train_trial builds it
        run = by_tid[t.user_attrs[TRIAL_ID_ATTR]]
        logged = run.data.params
        wrong = {k: (logged.get(k), v) for k, v in params.items() if logged.get(k) != safe_value(k, v)}
        if wrong:
            raise RuntimeError(f"trial {t.number}: Optuna params disagree with MLflow params: {wrong}")
        configs.append(cfg.model_dump(mode="json"))
        spans.append((run.info.end_time - run.info.start_time) / 1000.0)
        epoch_sums.append(sum(m.value for m in client.get_metric_history(run.info.run_id, "epoch_time_s")))
    return configs, spans, epoch_sums


def run_loop(configs: list[dict], fp: Path) -> dict:
    """The same trials, one after another, in this process, as train_trial builds them (1 thread)."""
    from oscqat.config import TrainConfig
    from oscqat.trainer import Trainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        fp_state = torch.load(fp, map_location="cpu", weights_only=True)
        epoch_sums, walls = [], []
        for cfg in configs:
            t1 = time.perf_counter()
            trainer = Trainer(TrainConfig.model_validate(cfg), pretrained_state=fp_state)
            trainer.fit()
            walls.append(time.perf_counter() - t1)
            epoch_sums.append(sum(h["epoch_time_s"] for h in trainer.history))
        wall = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    return {"wall_s": wall, "trial_span_s": walls, "trial_epoch_time_s": epoch_sums}


def _loop_worker(args: tuple[list[dict], str]) -> dict:
    configs, fp = args
    return run_loop(configs, Path(fp))


def run_loop_x2(configs: list[dict], fp: Path) -> dict:
    """The same trials split over 2 fresh processes (spawned, 1 thread each): the machine's own
    parallel speed-up, with process start-up included as Ray's trials include it."""
    import multiprocessing as mp

    halves = [configs[0::2], configs[1::2]]
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(2) as pool:
        outs = pool.map(_loop_worker, [(h, str(fp)) for h in halves])
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "trial_span_s": [s for o in outs for s in o["trial_span_s"]],
            "trial_epoch_time_s": [s for o in outs for s in o["trial_epoch_time_s"]]}


# main ------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write results to this file")
    ap.add_argument("--trials", type=int, default=4, help="trials per campaign (even, for the 2-concurrent run)")
    ap.add_argument("--epochs", type=int, default=32,
                    help="epochs per trial (pick so a trial takes >= 30 s; ~1 s/epoch here)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the three variants")
    ap.add_argument("--fp-epochs", type=int, default=3, help="epochs of the FP checkpoint made up front")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 trials x 2 epochs, 1 round")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, stores)")
    ap.add_argument("--with-reuse", action="store_true",
                    help="also run tune_c1 with reuse_actors=True forced (the runner sets it itself since 2026-11-27)")
    args = ap.parse_args()
    if args.quick:
        args.trials, args.epochs, args.rounds, args.fp_epochs = 2, 2, 1, 1

    work = Path(tempfile.mkdtemp(prefix="oscqat-bench-ovh-"))
    load_start = loadavg()
    say(f"work dir {work}; load average {load_start}")
    try:
        res = measure(args, work)
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        ray_tmp = os.environ.get("RAY_TMPDIR")
        if ray_tmp and ray_tmp.startswith("/tmp/oqb"):
            shutil.rmtree(ray_tmp, ignore_errors=True)
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    res["setup"].update(load_avg_start=load_start, load_avg_end=loadavg())
    report(res, args)


def measure(args, work: Path) -> dict:
    import mlflow
    import optuna
    import ray

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    fp = make_fp_checkpoint(work / "fp.pt", args.fp_epochs)
    ray_init_s = start_ray(work)
    say(f"ray.init(num_cpus=2): {ray_init_s:.1f} s")
    probe = thread_probe(work)
    say(f"1-CPU trial: OMP_NUM_THREADS={probe['omp_env']}, torch threads {probe['threads_before']} -> "
        f"{probe['threads_after']} after _set_threads()")

    runs: dict[str, list[dict]] = {"tune_c1": [], "loop": [], "tune_c2": [], "loop_x2": []}
    base_order = ["tune_c1", "loop", "tune_c2", "loop_x2"]
    if args.with_reuse:
        runs["tune_c1_reuse"] = []
        base_order.append("tune_c1_reuse")
    reference_configs = None
    for r in range(args.rounds):
        order = base_order if r % 2 == 0 else list(reversed(base_order))  # round 0 starts with tune_c1: its configs
        for variant in order:
            say(f"round {r + 1}/{args.rounds}: {variant} ({args.trials} trials x {args.epochs} epochs) ...")
            if variant == "loop":
                out = run_loop(reference_configs, fp)
            elif variant == "loop_x2":
                out = run_loop_x2(reference_configs, fp)
            else:
                conc = 2 if variant == "tune_c2" else 1
                out = run_tune(f"ovh-{variant.replace('_', '-')}-r{r}", work, fp, args.trials, args.epochs, conc,
                               reuse_actors=variant == "tune_c1_reuse")
                configs = out.pop("configs")
                if reference_configs is None:
                    reference_configs = configs
                elif configs != reference_configs:
                    raise RuntimeError(f"{variant} round {r}: the campaign sampled other configs than the first one")
            out["round"] = r
            out["load_avg"] = loadavg()
            runs[variant].append(out)
            say(f"  {variant}: {out['wall_s']:.1f} s (load {out['load_avg'][0]:.2f})")

    med = {v: statistics.median(x["wall_s"] for x in xs) for v, xs in runs.items()}
    per_round = [{"overhead": c1["wall_s"] / lp["wall_s"], "speedup": c1["wall_s"] / c2["wall_s"]}
                 for c1, lp, c2 in zip(runs["tune_c1"], runs["loop"], runs["tune_c2"])]
    loop_trial = statistics.median(s for x in runs["loop"] for s in x["trial_span_s"])
    ratios = {
        "tune_c1_over_loop": statistics.median(p["overhead"] for p in per_round),
        "speedup_c2_over_c1": statistics.median(p["speedup"] for p in per_round),
        # Where the overhead goes: slower epochs inside a Ray trial, or time between/around epochs.
        "epoch_time_tune_c1_over_loop": statistics.median(
            sum(c1["trial_epoch_time_s"]) / sum(lp["trial_epoch_time_s"])
            for c1, lp in zip(runs["tune_c1"], runs["loop"])),
        "epoch_time_tune_c2_over_c1": statistics.median(
            sum(c2["trial_epoch_time_s"]) / sum(c1["trial_epoch_time_s"])
            for c1, c2 in zip(runs["tune_c1"], runs["tune_c2"])),
    }
    ratios["speedup_loop_x2_over_loop"] = statistics.median(
        lp["wall_s"] / l2["wall_s"] for lp, l2 in zip(runs["loop"], runs["loop_x2"]))
    ratios["epoch_time_loop_x2_over_loop"] = statistics.median(
        sum(l2["trial_epoch_time_s"]) / sum(lp["trial_epoch_time_s"]) for lp, l2 in zip(runs["loop"], runs["loop_x2"]))
    if runs.get("tune_c1_reuse"):
        ratios["tune_c1_reuse_over_loop"] = statistics.median(
            c["wall_s"] / lp["wall_s"] for c, lp in zip(runs["tune_c1_reuse"], runs["loop"]))
    outside = [c1["wall_s"] - sum(c1["trial_span_s"]) for c1 in runs["tune_c1"]]
    around_fit = [c1["wall_s"] - c1["tuner_fit_s"] for c1 in runs["tune_c1"]]
    in_fit_between = [c1["tuner_fit_s"] - sum(c1["trial_span_s"]) for c1 in runs["tune_c1"]]
    inside_extra = [sum(c1["trial_span_s"]) - sum(c1["trial_epoch_time_s"]) - (lp["wall_s"] - sum(lp["trial_epoch_time_s"]))
                    for c1, lp in zip(runs["tune_c1"], runs["loop"])]
    return {
        "median_wall_s": med,
        "ratios": ratios,
        "per_round": per_round,
        "breakdown_s": {
            "ray_init_once": ray_init_s,
            "tune_c1_outside_trials_per_campaign": statistics.median(outside),
            "tune_c1_setup_and_summary_outside_tuner_fit": statistics.median(around_fit),
            "tune_c1_in_tuner_fit_outside_trial_runs": statistics.median(in_fit_between),
            "tune_c1_inside_trials_not_epochs_minus_loop_same": statistics.median(inside_extra),
            "loop_trial_median": loop_trial,
        },
        "cold_ratio_incl_ray_init": (med["tune_c1"] + ray_init_s) / med["loop"],
        "thread_probe": probe,
        "trial_configs": reference_configs,
        "runs": runs,
        "setup": {
            "arch": ARCH, "bits": BITS, "dataset": "digits", "base": BASE, "trials": args.trials,
            "epochs": args.epochs, "rounds": args.rounds, "quick": args.quick, "nproc": os.cpu_count(),
            "cpu_model": cpu_model(), "torch": torch.__version__, "ray": ray.__version__, "optuna": optuna.__version__,
            "mlflow": mlflow.__version__, "python": platform.python_version(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    }


def report(res: dict, args) -> None:
    applies = not args.quick and res["breakdown_s"]["loop_trial_median"] >= MIN_TRIAL_S
    res["targets"] = {
        "tune_c1_over_loop": {"target": f"<= {TARGET_OVERHEAD}", "applies": applies,
                              "met": res["ratios"]["tune_c1_over_loop"] <= TARGET_OVERHEAD},
        "speedup_c2_over_c1": {"target": f">= {TARGET_SPEEDUP}", "applies": not args.quick,
                               "met": res["ratios"]["speedup_c2_over_c1"] >= TARGET_SPEEDUP},
    }
    s = res["setup"]
    print(f"\nsearch overhead: {s['trials']} trials x {s['epochs']} epochs ({s['arch']} {s['bits']} on digits), "
          f"{s['rounds']} round(s); {s['nproc']} CPUs ({s['cpu_model']}); load avg start {s['load_avg_start']} "
          f"end {s['load_avg_end']}")
    probe = res["thread_probe"]
    print(f"1-CPU trial threads: OMP_NUM_THREADS={probe['omp_env']}, torch {probe['threads_before']} -> "
          f"{probe['threads_after']} after search.trainable._set_threads()")
    print(f"\n{'variant':<34}{'median wall (s)':>16}{'per trial (s)':>15}")
    labels = {"tune_c1": "campaign, 1 at a time (Ray/Tune)", "loop": "plain Trainer loop, 1 thread",
              "tune_c2": "campaign, 2 at a time (Ray/Tune)", "loop_x2": "plain loop, 2 processes at a time", "tune_c1_reuse": "campaign, 1 at a time, reuse_actors"}
    for v, t in res["median_wall_s"].items():
        print(f"{labels[v]:<34}{t:>16.1f}{t / s['trials']:>15.1f}")
    print()
    targets = {"tune_c1_over_loop": res["targets"]["tune_c1_over_loop"],
               "speedup_c2_over_c1": res["targets"]["speedup_c2_over_c1"]}
    for key, value in res["ratios"].items():
        verdict = ""
        if key in targets:
            t = targets[key]
            if not t["applies"]:
                verdict = f"  (target {t['target']}: does not apply to this run)"
            else:
                verdict = f"  (target {t['target']}: {'met' if t['met'] else 'MISSED'})"
        print(f"{key:<32}{value:>8.3f}{verdict}")
    b = res["breakdown_s"]
    print(f"\nray.init once: {b['ray_init_once']:.1f} s (ratio incl. it: {res['cold_ratio_incl_ray_init']:.3f}); "
          f"campaign time outside trial runs: {b['tune_c1_outside_trials_per_campaign']:.1f} s "
          f"({b['tune_c1_setup_and_summary_outside_tuner_fit']:.1f} s set-up/summary around Tuner.fit, "
          f"{b['tune_c1_in_tuner_fit_outside_trial_runs']:.1f} s inside it); "
          f"per-campaign non-epoch time inside trials beyond the loop's: "
          f"{b['tune_c1_inside_trials_not_epochs_minus_loop_same']:.1f} s")
    if args.quick:
        print("(--quick: tiny trials; the overhead target is for trials of >= 30 s and does not apply)")
    elif not applies:
        print(f"(a plain-loop trial took {b['loop_trial_median']:.1f} s < {MIN_TRIAL_S:.0f} s: raise --epochs "
              f"for the overhead target to apply)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
