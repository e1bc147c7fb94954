"""Benchmark: does the search driver scale to 1,000 trials? (Optuna suggest latency, MLflow cost, memory.)

A 1,000-trial campaign of a *trivial* trainable (3 instant "epochs" of random metrics with the names
the MLflow callback logs, a per-layer oscillation JSON string and a tiny checkpoint at the last
epoch, like the real trainable reports for short epochs) goes through the project's real driver: ``search.runner.run_campaign`` with the
``demo_net``/``w3a3`` define-by-run space, ``search.searcher.build_searcher`` (seeded multivariate,
grouped, constant-liar TPE; paper points enqueued first; Optuna storage from make_storage: sqlite in
WAL mode, or ``--optuna-storage journal``), ASHA on epochs, and
the real ``MlflowTrialCallback`` under a parent run (sqlite MLflow store). Only the trainable is
swapped (``search.runner._trainable``); every store lives in a temporary directory. The runner's
Tuner uses ``reuse_actors=True`` (``--no-reuse-actors`` forces Tune's default): on this 2-core
machine, starting a worker process per trivial trial otherwise starves the driver of CPU and the
driver's own costs cannot be told apart from process start-up.

Measured in the driver process:
  * Optuna suggest latency per trial (``StateAwareOptunaSearch.suggest``, incl. ask/storage) around
    trials ~10 / ~100 / ~1,000, and how much of it is the TPE sampler itself;
  * MLflow cost per trial: time spent in the callback's methods, attributed to the trial;
  * driver memory: RSS (``/proc/self/status``) sampled over time and at trial 100 vs 1,000.

The default runs trials as a laptop campaign does (1 CPU each, 2 at once on 2 cores);
``--cpu-per-trial 0.1 --concurrency 20`` is a stress setting in which 20 trial processes share
the driver's 2 cores. Targets: suggest <= 100 ms at 1,000 trials; driver memory flat (RSS growth from trial 100 to 1,000
<= 10% of RSS at trial 100). ``--explore`` then times ``ask`` on a copy of the finished study with
alternative sampler settings, to find a fix if TPE is slow.

    .venv/bin/python bench/driver_scale.py [--trials 1000] [--json FILE] [--explore]
    .venv/bin/python bench/driver_scale.py --quick     # ~100 trials
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import cpu_model, loadavg, say  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGET_SUGGEST_S = 0.100
TARGET_MEM_GROWTH = 0.10
MAX_EPOCHS = 3
LAYERS = ["stem.0", *(f"blocks.{b}.{i}" for b in range(4) for i in (0, 3)), "classifier"]  # demo_net's quant layers


def rss_mb() -> float:
    """Resident memory of this process (psutil if installed, else /proc/self/status)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# the trivial trainable -----------------------------------------------------------------------------
def make_fake_trial(metric_names: tuple[str, ...]):
    def fake_trial(config: dict) -> None:
        """3 instant epochs of plausible-looking metrics (val_top1 depends on lr and method)."""
        import json as _json
        import math as _math
        import random as _random
        import tempfile as _tempfile
        from pathlib import Path as _Path

        from ray import tune

        rng = _random.Random()
        quality = 0.9 - 0.15 * abs(_math.log10(config.get("lr", 0.05) / 0.05))
        quality -= {"lsq": 0.06, "dampen": 0.03, "freeze": 0.02}.get(config.get("method"), 0.0)
        for epoch in range(1, MAX_EPOCHS + 1):
            metrics = {k: rng.random() for k in metric_names}
            metrics.update(epoch=epoch, max_epochs=MAX_EPOCHS,
                           val_top1=max(0.0, min(1.0, quality - 0.1 / epoch + rng.gauss(0, 0.02))),
                           layer_osc=json.dumps({name: round(rng.random() * 0.05, 6) for name in LAYERS}))
            if epoch < MAX_EPOCHS:  # as train_trial does for short epochs (checkpoint_interval_s)
                tune.report(metrics)
                continue
            with _tempfile.TemporaryDirectory() as tmp:
                (_Path(tmp) / "metrics.json").write_text(_json.dumps({"epoch": epoch}))
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))

    return fake_trial


# instrumentation -------------------------------------------------------------------------------------
class Probe:
    """Timings and memory samples collected in the driver (module-level: nothing here is pickled)."""

    def __init__(self):
        self.suggest: list[tuple[int, float, float, float]] = []  # (k, seconds, sampler seconds, rss MB)
        self.sampler_s = 0.0
        self.searcher_events: dict[str, list[float]] = defaultdict(list)
        self.mlflow: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))  # trial -> method -> s
        self.mlflow_order: list[str] = []  # trial ids in completion order
        self.mlflow_end_s = 0.0
        self.mem: list[tuple[float, int, float]] = []  # (t, trials suggested, rss MB)
        self.t0 = time.perf_counter()
        self._stop = threading.Event()
        self.snap_at: set[int] = set()  # --tracemalloc: take heap snapshots at these trial numbers
        self.snapshots: dict = {}

    def sample_memory(self, every_s: float) -> threading.Thread:
        def loop():
            while not self._stop.wait(every_s):
                self.mem.append((time.perf_counter() - self.t0, len(self.suggest), rss_mb()))

        thread = threading.Thread(target=loop, daemon=True, name="rss-sampler")
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()


PROBE = Probe()


def _timed_sampler(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            PROBE.sampler_s += time.perf_counter() - t0

    return wrapper


def instrument() -> None:
    """Class-level wrappers (instances stay picklable for Tune's experiment checkpoints)."""
    import optuna

    import search.searcher as searcher_mod
    from search.searcher import StateAwareOptunaSearch
    from search.tracking import MlflowTrialCallback

    for cls in {optuna.samplers.TPESampler, optuna.samplers.RandomSampler}:
        for name in ("infer_relative_search_space", "sample_relative", "sample_independent"):
            setattr(cls, name, _timed_sampler(getattr(cls, name)))

    original_suggest = StateAwareOptunaSearch.suggest

    def suggest(self, trial_id):
        s0 = PROBE.sampler_s
        t0, c0 = time.perf_counter(), time.thread_time()
        out = original_suggest(self, trial_id)
        dt, cpu = time.perf_counter() - t0, time.thread_time() - c0
        PROBE.suggest.append((len(PROBE.suggest) + 1, dt, PROBE.sampler_s - s0, rss_mb(), cpu))
        if PROBE.snap_at and len(PROBE.suggest) in PROBE.snap_at:
            import tracemalloc

            PROBE.snapshots[len(PROBE.suggest)] = tracemalloc.take_snapshot()
        return out

    StateAwareOptunaSearch.suggest = suggest
    for name in ("on_trial_result", "on_trial_complete"):
        def make(name=name, original=getattr(StateAwareOptunaSearch, name)):
            def wrapper(self, *args, **kwargs):
                t0 = time.perf_counter()
                try:
                    return original(self, *args, **kwargs)
                finally:
                    PROBE.searcher_events[name].append(time.perf_counter() - t0)
            return wrapper
        setattr(StateAwareOptunaSearch, name, make())

    for name in ("on_trial_start", "on_trial_restore", "on_trial_result", "on_trial_recover", "on_trial_complete",
                 "on_trial_error"):
        def make_cb(name=name, original=getattr(MlflowTrialCallback, name)):
            @functools.wraps(original)
            def wrapper(self, *args, **kwargs):
                t0 = time.perf_counter()
                try:
                    return original(self, *args, **kwargs)
                finally:
                    trial = kwargs.get("trial")
                    tid = getattr(trial, "trial_id", "?")
                    PROBE.mlflow[tid][name] += time.perf_counter() - t0
                    if name in ("on_trial_complete", "on_trial_error"):
                        PROBE.mlflow_order.append(tid)
            return wrapper
        setattr(MlflowTrialCallback, name, make_cb())

    original_end = MlflowTrialCallback.on_experiment_end

    @functools.wraps(original_end)
    def on_experiment_end(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original_end(self, *args, **kwargs)
        finally:
            PROBE.mlflow_end_s += time.perf_counter() - t0

    MlflowTrialCallback.on_experiment_end = on_experiment_end
    assert searcher_mod.StateAwareOptunaSearch is StateAwareOptunaSearch


def swap_trainable() -> None:
    """The runner's trainable -> the trivial one, with the campaign's resources."""
    from ray import tune

    import search.runner as runner
    from search.tracking import SCALAR_METRICS

    fake = make_fake_trial(tuple(SCALAR_METRICS))

    def _trainable(campaign, base_config, fp_state):
        return tune.with_resources(fake, {"cpu": campaign.resources.cpu, "gpu": campaign.resources.gpu})

    runner._trainable = _trainable


def disable_actor_reuse() -> None:
    """``TuneConfig(reuse_actors=False)`` (Tune's default; the runner sets True since 2026-11-27)."""
    from ray import tune

    original = tune.TuneConfig

    def TuneConfig(*args, **kwargs):  # noqa: N802 - stands in for the class
        kwargs["reuse_actors"] = False
        return original(*args, **kwargs)

    tune.TuneConfig = TuneConfig


# campaign --------------------------------------------------------------------------------------------
def start_ray() -> float:
    os.environ.pop("RAY_ADDRESS", None)
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="oqd", dir="/tmp")  # private; short socket paths
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    import logging

    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True, configure_logging=True,
             logging_level=logging.WARNING)
    return time.perf_counter() - t0


def run(args, work: Path) -> dict:
    import torch

    from oscqat import create_model
    from search.campaign import Campaign
    from search.runner import run_campaign

    fp = work / "fp.pt"
    torch.save(create_model("demo_net", num_classes=10, in_chans=1).state_dict(), fp)  # never trained on: fake trials
    campaign = Campaign.model_validate({
        "name": "driver-scale", "dataset": "digits", "targets": [{"arch": "demo_net", "bits": "w3a3", "pretrained": str(fp)}],
        "budget": {"num_samples": args.trials, "max_epochs": MAX_EPOCHS, "grace_period": 1, "reduction_factor": 2,
                   "allow_early_rungs": True},
        "confirm": None,
        "resources": {"cpu": args.cpu_per_trial, "gpu": 0}, "max_concurrent_trials": args.concurrency, "seed": 0,
        "storage_path": str(work / "ray_results"), "mlflow": {"tracking_uri": f"sqlite:///{work}/mlflow.db"},
        "optuna_storage": (f"journal:///{work}/optuna.journal" if args.optuna_storage == "journal"
                           else f"sqlite:///{work}/optuna.db"),
    })
    instrument()
    swap_trainable()
    if not args.reuse_actors:
        disable_actor_reuse()
    ray_init_s = start_ray()
    say(f"ray.init(num_cpus=2): {ray_init_s:.1f} s; running {args.trials} trivial trials "
        f"({args.cpu_per_trial} CPU each, up to {args.concurrency} at once) ...")
    rss_before = rss_mb()
    PROBE.t0 = time.perf_counter()
    sampler = PROBE.sample_memory(0.5)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    progress = threading.Thread(target=_progress, args=(args.trials,), daemon=True)
    progress.start()
    with open(work / "campaign.log", "w") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        results = run_campaign(campaign)
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    PROBE.stop()
    sampler.join()
    return {"wall_s": wall, "driver_cpu_s": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
            "ray_init_s": ray_init_s, "rss_before_mb": rss_before, "counts": results[0].counts,
            "best_val_top1": results[0].best_val_top1, "campaign": campaign}


def _progress(total: int) -> None:
    last = -1
    while not PROBE._stop.wait(30):
        n = len(PROBE.suggest)
        if n != last:
            say(f"  {n}/{total} trials suggested, {len(PROBE.mlflow_order)} finished, RSS {rss_mb():.0f} MB")
            last = n


# analysis --------------------------------------------------------------------------------------------
def window_stats(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    values = sorted(values)
    return {"n": len(values), "median_ms": 1000 * statistics.median(values),
            "p90_ms": 1000 * values[min(len(values) - 1, int(0.9 * len(values)))], "max_ms": 1000 * values[-1]}


def analyse(out: dict, trials: int) -> dict:
    sug = PROBE.suggest
    points = [p for p in (10, 100, 1000) if p <= trials]
    if trials not in points:
        points.append(trials)
    windows = {}
    for p in points:
        half = max(5, p // 20)  # ~10: 5..15; ~100: 95..105 -> widened to +-5%; ~1000: 950..1000
        lo, hi = max(1, p - half), min(trials, p + half)
        if p == trials:
            lo, hi = max(1, p - 2 * half), p
        sel = [(dt, ds, cpu) for k, dt, ds, _, cpu in sug if lo <= k <= hi]
        windows[f"~{p}"] = {"trials": [lo, hi], **window_stats([dt for dt, _, _ in sel]),
                            "sampler_median_ms": 1000 * statistics.median([ds for _, ds, _ in sel]) if sel else None,
                            # the driver thread's own CPU time: wall minus waiting for a core or I/O
                            "cpu_median_ms": 1000 * statistics.median([c for _, _, c in sel]) if sel else None}
    rss_at = {}
    for p in points:
        hits = [r for k, _, _, r, _ in sug if k == p]
        rss_at[str(p)] = hits[0] if hits else None
    per_trial = []
    for tid in PROBE.mlflow_order:
        per_trial.append(sum(PROBE.mlflow[tid].values()))
    by_method = defaultdict(list)
    for tid in PROBE.mlflow_order:
        for name, s in PROBE.mlflow[tid].items():
            by_method[name].append(s)
    n_done = len(per_trial)
    early = per_trial[: max(1, n_done // 10)]
    late = per_trial[-max(1, n_done // 10):]
    mem = PROBE.mem
    growth = None
    if rss_at.get("100") is not None and rss_at.get(str(points[-1])) is not None and points[-1] > 100:
        growth = {"from_trial": 100, "to_trial": points[-1], "mb": rss_at[str(points[-1])] - rss_at["100"],
                  "fraction": (rss_at[str(points[-1])] - rss_at["100"]) / rss_at["100"],
                  "kb_per_trial": 1024 * (rss_at[str(points[-1])] - rss_at["100"]) / (points[-1] - 100)}
    return {
        "wall_s": out["wall_s"], "trials_per_s": trials / out["wall_s"], "driver_cpu_s": out["driver_cpu_s"],
        "driver_cpu_ms_per_trial": 1000 * out["driver_cpu_s"] / trials, "ray_init_s": out["ray_init_s"],
        "counts": out["counts"], "best_val_top1": out["best_val_top1"],
        "suggest": windows,
        "suggest_total_s": sum(dt for _, dt, _, _, _ in sug),
        "searcher_events_ms_median": {k: 1000 * statistics.median(v) for k, v in PROBE.searcher_events.items() if v},
        "searcher_events_total_s": {k: sum(v) for k, v in PROBE.searcher_events.items()},
        "mlflow": {
            "per_trial": window_stats(per_trial),
            "per_trial_first_10pct": window_stats(early), "per_trial_last_10pct": window_stats(late),
            "by_method_median_ms": {k: 1000 * statistics.median(v) for k, v in by_method.items()},
            "total_s": sum(per_trial) + PROBE.mlflow_end_s, "experiment_end_flush_s": PROBE.mlflow_end_s,
        },
        "memory_mb": {"before_campaign": out["rss_before_mb"], "at_trial": rss_at,
                      "max_sampled": max((r for _, _, r in mem), default=None), "peak_vmhwm": peak_rss_mb(),
                      "end": mem[-1][2] if mem else None, "growth_100_to_last": growth},
        "memory_trace": [(round(t, 1), n, round(r, 1)) for t, n, r in mem[:: max(1, len(mem) // 400)]],
        "suggest_trace": [(k, round(1000 * dt, 2), round(1000 * ds, 2), round(r, 1), round(1000 * c, 2))
                          for k, dt, ds, r, c in sug],
    }


def heap_growth(first, last, top: int = 15) -> dict:
    """Live Python heap growth between two tracemalloc snapshots, by package and by file."""
    stats = last.compare_to(first, "filename")
    by_pkg: dict[str, float] = defaultdict(float)
    for st in stats:
        name = st.traceback[0].filename
        if "site-packages/" in name:
            pkg = name.split("site-packages/", 1)[1].split("/", 1)[0]
        elif str(ROOT) in name:
            pkg = "oscqat project: " + name.split(str(ROOT) + "/", 1)[1].split("/", 1)[0]
        else:
            pkg = "stdlib/other: " + Path(name).name
        by_pkg[pkg] += st.size_diff / 2**20
    return {"total_mb": sum(st.size_diff for st in stats) / 2**20,
            "by_package_mb": dict(sorted(by_pkg.items(), key=lambda kv: -kv[1])[:top]),
            "by_file_mb": {f"{st.traceback[0].filename.split('site-packages/')[-1]}": st.size_diff / 2**20
                           for st in stats[:top]}}


# --explore: what would make suggest faster at this size? ---------------------------------------------
def _time_asks(study, space, asks: int) -> dict:
    import optuna

    times = []
    for _ in range(asks):
        t0 = time.perf_counter()
        trial = study.ask()
        space.define_by_run(trial)
        times.append(time.perf_counter() - t0)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)  # FAIL: the history TPE sees stays the same
    return window_stats(times)


def plain_sqlite_storage(url: str):
    """RDBStorage with SQLite's default rollback journal: what make_storage built before 2026-11-27."""
    import optuna

    return optuna.storages.RDBStorage(url, heartbeat_interval=None)


def explore(campaign, work: Path, asks: int) -> dict:
    """Time ``ask`` + define-by-run on copies of the finished study: sampler settings on an in-memory
    copy (the sampler's own cost), then the project's sampler on other storages (the storage's cost)."""
    import optuna

    from search.searcher import make_sampler, make_storage
    from spaces import load_space

    target = campaign.targets[0]
    space = load_space(campaign.space_for(target), target.bits)
    src = campaign.study_name(target)
    storage = make_storage(campaign.optuna_storage)
    n = len(optuna.load_study(study_name=src, storage=storage).get_trials(deepcopy=False))
    samplers = {
        "project TPE (multivariate, group, constant_liar)": dict(multivariate=True, group=True, constant_liar=True),
        "  + n_ei_candidates=8": dict(multivariate=True, group=True, constant_liar=True, n_ei_candidates=8),
        "  without group": dict(multivariate=True, group=False, constant_liar=True),
        "  without constant_liar": dict(multivariate=True, group=True, constant_liar=False),
        "independent TPE (constant_liar)": dict(multivariate=False, constant_liar=True),
        "random": None,
    }
    out = {"study_trials": n, "sampler_in_memory": {}, "storage_project_sampler": {}}
    for i, (label, kw) in enumerate(samplers.items()):
        mem = optuna.storages.InMemoryStorage()
        optuna.copy_study(from_study_name=src, from_storage=storage, to_storage=mem, to_study_name=f"s{i}")
        sampler = optuna.samplers.RandomSampler(seed=1) if kw is None else optuna.samplers.TPESampler(seed=1, **kw)
        out["sampler_in_memory"][label] = _time_asks(optuna.load_study(study_name=f"s{i}", storage=mem, sampler=sampler),
                                                     space, asks)
    storages = {
        "sqlite, plain RDBStorage (rollback journal, before)": lambda: plain_sqlite_storage(
            f"sqlite:///{work}/explore-plain.db"),
        "sqlite:///, as make_storage builds it (WAL + synchronous=NORMAL)": lambda: make_storage(
            f"sqlite:///{work}/explore-wal.db"),
        "journal:///, as make_storage builds it (JournalFileBackend)": lambda: make_storage(
            f"journal:///{work}/explore.journal"),
        "in-memory": optuna.storages.InMemoryStorage,
    }
    for label, make in storages.items():
        dst = make()
        optuna.copy_study(from_study_name=src, from_storage=storage, to_storage=dst, to_study_name="copy")
        study = optuna.load_study(study_name="copy", storage=dst, sampler=make_sampler(1))
        out["storage_project_sampler"][label] = _time_asks(study, space, asks)
    return out


# main ------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write results to this file")
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--cpu-per-trial", type=float, default=1.0,
                    help="CPUs per trial (the campaign default is 1; 0.1 with --concurrency 20 is the stress setting)")
    ap.add_argument("--concurrency", type=int, default=2, help="max_concurrent_trials (default: 2 CPUs / 1 CPU)")
    ap.add_argument("--reuse-actors", action=argparse.BooleanOptionalAction, default=True,
                    help="TuneConfig(reuse_actors=...): the runner sets True; --no-reuse-actors gives Tune's default")
    ap.add_argument("--optuna-storage", choices=("sqlite", "journal"), default="sqlite",
                    help="the campaign's optuna_storage: sqlite:/// (default) or journal:///")
    ap.add_argument("--explore", action="store_true", help="afterwards, time ask() with other sampler settings")
    ap.add_argument("--explore-asks", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="~100 trials")
    ap.add_argument("--tracemalloc", action="store_true",
                    help="where does driver memory grow? heap snapshots at trial 100 and the last (slows the driver)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    if args.quick:
        args.trials = min(args.trials, 100)

    import mlflow
    import optuna
    import ray

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="oscqat-bench-drv-"))
    if args.tracemalloc:
        import tracemalloc

        tracemalloc.start(1)
        PROBE.snap_at = {min(100, args.trials // 3), args.trials}
    load_start = loadavg()
    say(f"work dir {work}; load average {load_start}")
    try:
        out = run(args, work)
        res = analyse(out, args.trials)
        if len(PROBE.snapshots) == 2:
            res["tracemalloc_growth"] = heap_growth(*[PROBE.snapshots[k] for k in sorted(PROBE.snapshots)])
            res["tracemalloc_growth"]["trials"] = sorted(PROBE.snapshots)
        if args.explore:
            say("exploring sampler settings on a copy of the finished study ...")
            res["explore_ask_latency"] = explore(out["campaign"], work, args.explore_asks)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        ray_tmp = os.environ.get("RAY_TMPDIR")
        if ray_tmp and ray_tmp.startswith("/tmp/oqd"):
            shutil.rmtree(ray_tmp, ignore_errors=True)
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    res["setup"] = {
        "trials": args.trials, "cpu_per_trial": args.cpu_per_trial, "max_concurrent_trials": args.concurrency,
        "epochs_per_trial": MAX_EPOCHS, "reuse_actors": args.reuse_actors, "space": "demo_net/w3a3",
        "sampler": "TPE(multivariate, group, constant_liar)",
        "scheduler": "ASHA(grace 1, rf 2, max_t 3)", "quick": args.quick, "nproc": os.cpu_count(),
        "cpu_model": cpu_model(), "ray": ray.__version__, "optuna": optuna.__version__, "mlflow": mlflow.__version__,
        "python": platform.python_version(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_avg_start": load_start, "load_avg_end": loadavg(),
    }
    report(res, args)


def report(res: dict, args) -> None:
    s = res["setup"]
    last = f"~{args.trials}" if f"~{args.trials}" in res["suggest"] else list(res["suggest"])[-1]
    sug_last = res["suggest"][last]["median_ms"] / 1000
    growth = res["memory_mb"]["growth_100_to_last"]
    res["targets"] = {
        "suggest_at_1000": {"target": f"<= {TARGET_SUGGEST_S * 1000:.0f} ms", "applies": args.trials >= 1000,
                            "value_ms": sug_last * 1000, "met": sug_last <= TARGET_SUGGEST_S},
        "memory_flat": {"target": f"growth trial 100 -> {args.trials} <= {TARGET_MEM_GROWTH:.0%}",
                        "applies": args.trials >= 1000,
                        "met": growth is not None and growth["fraction"] <= TARGET_MEM_GROWTH},
    }
    print(f"\ndriver scale: {s['trials']} trivial trials ({s['cpu_per_trial']} CPU, <= {s['max_concurrent_trials']} at once), "
          f"{s['nproc']} CPUs ({s['cpu_model']}); load avg start {s['load_avg_start']} end {s['load_avg_end']}")
    print(f"wall {res['wall_s']:.0f} s ({res['trials_per_s']:.2f} trials/s), driver CPU {res['driver_cpu_s']:.0f} s "
          f"({res['driver_cpu_ms_per_trial']:.0f} ms/trial); trial states {res['counts']}")
    print(f"\n{'Optuna suggest (per trial)':<28}{'trials':>12}{'median ms':>11}{'p90 ms':>9}{'max ms':>9}{'TPE ms':>9}"
          f"{'CPU ms':>9}")
    for key, w in res["suggest"].items():
        if w.get("n"):
            print(f"{'at ' + key:<28}{'%d-%d' % tuple(w['trials']):>12}{w['median_ms']:>11.1f}{w['p90_ms']:>9.1f}"
                  f"{w['max_ms']:>9.1f}{w['sampler_median_ms']:>9.1f}{w['cpu_median_ms']:>9.1f}")
    print("(CPU ms: the driver thread's own CPU time per suggest; the rest of the wall time it waited for a core")
    print(f" while up to {res['setup']['max_concurrent_trials']} trial processes and Ray's daemons shared the cores, or for I/O)")
    ev = res["searcher_events_ms_median"]
    print("searcher bookkeeping (median ms per call): " + ", ".join(f"{k} {v:.1f}" for k, v in ev.items()))
    m = res["mlflow"]
    print(f"\n{'MLflow callback per trial':<28}{'median ms':>11}{'p90 ms':>9}{'max ms':>9}")
    for label, key in (("all trials", "per_trial"), ("first 10%", "per_trial_first_10pct"),
                       ("last 10%", "per_trial_last_10pct")):
        w = m[key]
        print(f"{label:<28}{w['median_ms']:>11.1f}{w['p90_ms']:>9.1f}{w['max_ms']:>9.1f}")
    print("by method (median ms per trial): " + ", ".join(f"{k} {v:.1f}" for k, v in m["by_method_median_ms"].items()))
    mem = res["memory_mb"]
    at = ", ".join(f"trial {k}: {v:.0f}" for k, v in mem["at_trial"].items() if v is not None)
    print(f"\ndriver RSS (MB): before {mem['before_campaign']:.0f}; {at}; max sampled {mem['max_sampled']:.0f}; "
          f"peak (VmHWM) {mem['peak_vmhwm']:.0f}")
    if growth:
        print(f"growth trial {growth['from_trial']} -> {growth['to_trial']}: {growth['mb']:+.0f} MB "
              f"({growth['fraction']:+.1%}, {growth['kb_per_trial']:.0f} KB/trial)")
    print()
    for key, t in res["targets"].items():
        state = "does not apply (fewer than 1,000 trials)" if not t["applies"] else ("met" if t["met"] else "MISSED")
        print(f"target {key} ({t['target']}): {state}")
    if "tracemalloc_growth" in res:
        g = res["tracemalloc_growth"]
        print(f"\nlive Python heap growth, trial {g['trials'][0]} -> {g['trials'][1]}: {g['total_mb']:+.1f} MB; by package (MB):")
        for k, v in g["by_package_mb"].items():
            print(f"  {k:<60}{v:>+8.1f}")
        print("by file (MB):")
        for k, v in g["by_file_mb"].items():
            print(f"  {k[-70:]:<72}{v:>+8.1f}")
    if "explore_ask_latency" in res:
        ex = res["explore_ask_latency"]
        print(f"\nask() + define-by-run on a copy of the study ({ex['study_trials']} trials)")
        print(f"{'sampler, in-memory storage':<52}{'median ms':>11}{'p90 ms':>9}")
        for label, w in ex["sampler_in_memory"].items():
            print(f"{label:<52}{w['median_ms']:>11.1f}{w['p90_ms']:>9.1f}")
        print(f"{'storage, project sampler':<52}{'median ms':>11}{'p90 ms':>9}")
        for label, w in ex["storage_project_sampler"].items():
            print(f"{label:<52}{w['median_ms']:>11.1f}{w['p90_ms']:>9.1f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
