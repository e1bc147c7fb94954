"""Reproduce the paper's findings at laptop scale on digits_hard; write RESULTS.md and results.json.

Everything goes through the project's own API (oscqat Trainer, toy, search.runner). Splits:
train / selection (``val_top1``, what the search sees) / a fixed held-out test split (every
accuracy below). Both small nets (demo_net, mini_mobilenet_v2), the shipped quantizer lr.

    .venv/bin/python bench/evidence.py            # full run (~1 h on 2 quiet cores), rewrites docs/
    .venv/bin/python bench/evidence.py --quick    # every section at tiny size (~3 min), writes to --out

Quick mode writes to /tmp/oscqat-evidence-quick unless ``--out`` says otherwise, so a smoke test
never overwrites the committed docs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import math
import platform
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from oscqat import TrainConfig, Trainer, stats  # noqa: E402
from oscqat.bn import bn_layers, reestimate_bn  # noqa: E402
from oscqat.toy import run_toy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATASET = "digits_hard"
NETS = ("demo_net", "mini_mobilenet_v2")
METHODS = ("lsq", "dampen", "freeze", "dampen+freeze")
LABELS = ("lsq", "lsq+bnre", "dampen", "freeze", "dampen+freeze")


def shipped_quantizer_lr(bits: str) -> float:
    """The demo space's starting-point quantizer lr at these bits (scale-driven flips well under half)."""
    from spaces import load_space

    return float(load_space("demo_net", bits).starting_point("lsq-baseline")["quantizer_lr"])


QAT = dict(dataset=DATASET, batch_size=64, lr=0.02, weight_decay=5e-5,
           osc_momentum=0.01, dampen_lambda=0.1, freeze_threshold_start=0.1, freeze_threshold_end=0.011,
           bn_reestimate_batches=20, device="cpu")
# MobileNetV2 W3 release recipes (METHOD.md section 7): dampening OR freezing, never both.
RELEASE = {
    "release-dampen": dict(method="dampen", lr=0.01, weight_decay=2.5e-5, quantizer_lr=1e-5, dampen_lambda=0.1,
                           dampen_start=0.25),
    "release-freeze": dict(method="freeze", lr=0.01, weight_decay=2.5e-5, quantizer_lr=1e-5, osc_momentum=1e-3,
                           freeze_threshold_start=0.1, freeze_threshold_end=0.011, freeze_start=0.25),
}
# The freeze recipe adapted to a run of ~1-2k steps: an EMA horizon of 100 steps (m = 0.01) instead
# of the release's 1,000, so its frequencies can reach the thresholds at all.
ADAPTED = dict(RELEASE["release-freeze"], osc_momentum=0.01, lr=0.02)
# The confirm stage of the evidence campaigns: top 2 x 2 seeds, not the product's 3 x 3 (which alone
# would cost 108 trial-epochs per campaign seed, over the hour on 2 cores).
CONFIRM = {"top_k": 2, "seeds": 2}
# Sizes: (full, quick)
SIZES = dict(
    fp_epochs=(15, 1), osc_epochs=(10, 1), acc_epochs=(6, 1), acc_seeds=(5, 2), search_seeds=(5, 1),
    search_epochs=(6, 2), random_trials=(6, 2), tpe_trials=(10, 2), toy_steps=(3000, 400),
    acc_bits=(("w4a4", "w3a3", "w2a2"), ("w2a2",)),
    # accuracy on the demo net only: a QAT step on digits_hard costs ~0.15-0.25 s on one core, and
    # 2 nets x 3 bits x 4 methods x 5 seeds would not fit the hour (see the report's estimate)
    acc_nets=(NETS[:1], NETS[:1]),
)


JOBS = 2  # worker processes for the independent training runs (set by --jobs)


def _init_worker() -> None:
    torch.set_num_threads(1)


def run_parallel(fn, jobs: list) -> list:
    """``fn(job)`` for every job, in order, over ``JOBS`` single-threaded worker processes: the
    runs are independent and each uses one core best, so two cores give ~2x."""
    if JOBS <= 1 or len(jobs) <= 1:
        return [fn(j) for j in jobs]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(JOBS, mp_context=ctx, initializer=_init_worker) as pool:
        return list(pool.map(fn, jobs))


def train_last(cfg: dict) -> dict:
    """Train one config; its last epoch's metrics (a worker job)."""
    last = Trainer(TrainConfig(**cfg)).fit()[-1]
    return {k: last.get(k) for k in ("test_top1", "test_top1_no_bnre", "val_top1", "osc_frac", "frozen_frac")}


def log(msg: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


def size(name: str, quick: bool):
    return SIZES[name][1 if quick else 0]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and *sample* std (n - 1, ``oscqat.stats``); std 0 for a single value."""
    ms = stats.mean_std(values)
    return ms.mean, ms.std or 0.0


def paired(a: list[float], b: list[float]) -> dict:
    """Paired difference a - b over shared seeds (``oscqat.stats.paired_diff``): mean, sample std
    and a t-based 95% interval (nan for a single seed)."""
    d = stats.paired_diff(dict(enumerate(a)), dict(enumerate(b)))
    return {"mean": d.mean, "std": d.std or 0.0, "ci95": list(d.ci95) if d.ci95 else [math.nan, math.nan], "n": d.n}


def fp_checkpoint(job: tuple[str, bool, Path]) -> dict:
    """One FP checkpoint per net (seed 0); accuracy seeds vary the QAT run, the test split is fixed."""
    arch, quick, out = job
    path = out / f"fp-{arch}.pt"
    cfg = TrainConfig(arch=arch, bits="fp32", dataset=DATASET, epochs=size("fp_epochs", quick), lr=0.05,
                      weight_decay=5e-4, seed=0, bn_reestimate_batches=0, device="cpu")
    t = Trainer(cfg)
    t0 = time.perf_counter()
    last = t.fit()[-1]
    t.save_model(path)
    info = {"arch": arch, "epochs": cfg.epochs, "steps": t.global_step, "val_top1": last["val_top1"],
            "test_top1": last["test_top1"], "s_per_step": (time.perf_counter() - t0) / t.global_step}
    log(f"FP {arch}: val {last['val_top1']:.4f} test {last['test_top1']:.4f} ({info['s_per_step'] * 1e3:.1f} ms/step)")
    return info


# 0. the benchmark ------------------------------------------------------------------------
def sample_figure(path: Path) -> None:
    """Per class: the 8x8 source digit, then renderings of it (train sources) and of test sources."""
    from oscqat.data import load_digits_tensors, three_way_split
    from oscqat.digits_hard import DEFAULT_SIZE, VARIANTS, rendered_digits

    src, y_src = load_digits_tensors(None, 1)
    x, _ = rendered_digits(DEFAULT_SIZE)
    train_idx, _, test_idx = three_way_split(len(src), 0.2, 0)
    cols = 1 + VARIANTS + VARIANTS
    fig, axes = plt.subplots(10, cols, figsize=(cols * 0.9, 10 * 0.95))
    for digit in range(10):
        tr = int(next(i for i in train_idx.tolist() if y_src[i] == digit))
        te = int(next(i for i in test_idx.tolist() if y_src[i] == digit))
        images = [src[tr, 0]] + [x[v * len(src) + tr, 0] for v in range(VARIANTS)] + \
                 [x[v * len(src) + te, 0] for v in range(VARIANTS)]
        for col, img in enumerate(images):
            ax = axes[digit, col]
            ax.imshow(img, cmap="gray", interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
        axes[digit, 0].set_ylabel(str(digit), rotation=0, labelpad=10)
    axes[0, 0].set_title("source\n8x8", fontsize=8)
    for v in range(VARIANTS):
        axes[0, 1 + v].set_title(f"train\nrendering {v}", fontsize=8)
        axes[0, 1 + VARIANTS + v].set_title(f"test digit\nrendering {v}", fontsize=8)
    fig.suptitle(f"digits_hard: scikit-learn digits rendered at {DEFAULT_SIZE} px\n(seeded affine + elastic warp, "
                 "distractor, contrast, background ramp, noise)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def benchmark_section(quick: bool, work: Path, fig: Path) -> dict:
    from oscqat.data import build_data

    sample_figure(fig / "digits_hard_samples.png")
    data = build_data(TrainConfig(dataset=DATASET, seed=0))
    fps = dict(zip(NETS, run_parallel(fp_checkpoint, [(arch, quick, work) for arch in NETS])))
    return {"dataset": DATASET, "image_size": data.image_size, "train": data.train.num_samples,
            "selection": data.val.num_samples, "test": data.test.num_samples,
            "fp_test_top1": {arch: fps[arch]["test_top1"] for arch in NETS}, "fp": fps}


# 1. toy regression -------------------------------------------------------------------------
def toy_section(quick: bool, fig_dir: Path) -> dict:
    import numpy as np

    steps = size("toy_steps", quick)
    out = {}
    for lam in (0.1, 1.0):  # the paper's lambda, and the stronger one shown in the figure
        runs = {m: run_toy(w_star=0.234, method=m, steps=steps, lr=0.05, scale=0.1, seed=0, dampen_lambda=lam)
                for m in ("lsq", "dampen", "freeze")}
        half = steps // 2
        out[f"lambda={lam}"] = {
            m: {"dampen_lambda": lam, "flips_second_half": r.flips(start=half),
                "time_avg_q_second_half": r.time_average_q(start=half), "up_fraction": r.up_fraction(start=half),
                "expected_up_fraction": r.expected_up_fraction, "final_q": float(r.q[-1])}
            for m, r in runs.items()}
        if lam != 1.0:
            continue
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.4), sharey=True)
        for ax, (m, r) in zip(axes, runs.items()):
            ax.plot(r.latent, lw=0.8, label="latent w")
            ax.plot(np.convolve(r.q, np.ones(100) / 100, mode="valid"), lw=1.2, label="q(w), mean over 100 steps")
            ax.axhline(r.w_star, color="k", ls="--", lw=0.8, label="w*")
            ax.axhline(r.threshold, color="grey", ls=":", lw=0.8, label="rounding threshold")
            ax.set_title(m + (f" (lambda {lam})" if m == "dampen" else ""))
            ax.set_xlabel("step")
        axes[0].set_ylabel("weight")
        axes[0].legend(fontsize=7, loc="lower right")
        fig.suptitle(f"Toy regression: one latent weight, grid step 0.1, w* = 0.234, dampening lambda {lam}")
        fig.tight_layout()
        fig.savefig(fig_dir / "toy_trajectories.png", dpi=110)
        plt.close(fig)
    return out


# 2. oscillations and BN statistics ------------------------------------------------------------
@torch.no_grad()
def bn_mismatch(trainer: Trainer, loader, batches: int) -> dict:
    """Population statistics of each BN input (inference mode) over ``loader`` vs the running stats."""
    model = trainer.model
    layers = bn_layers(model)
    acc = {id(m): [0, 0.0, 0.0] for m in layers}

    def hook(mod, inp, _out):
        x = inp[0].transpose(0, 1).reshape(inp[0].shape[1], -1).double()
        a = acc[id(mod)]
        a[0] += x.shape[1]
        a[1] = a[1] + x.sum(1)
        a[2] = a[2] + (x * x).sum(1)

    handles = [m.register_forward_hook(hook) for m in layers]
    model.eval()
    for i, (x, _) in enumerate(loader):
        if i >= batches:
            break
        model(x.to(trainer.device))
    for h in handles:
        h.remove()
    mean_err, var_err = [], []
    for m in layers:
        n, s1, s2 = acc[id(m)]
        mu = s1 / n
        var = (s2 / n - mu * mu).clamp_min(1e-12)
        rm, rv = m.running_mean.double(), m.running_var.double().clamp_min(1e-12)
        mean_err.append(float(((rm - mu).abs() / var.sqrt()).mean()))
        var_err.append(float((rv / var).log().abs().mean()))
    model.train()
    return {"mean_shift": statistics.fmean(mean_err), "log_var_ratio": statistics.fmean(var_err)}


def second_half_mean(history: list[dict], key: str) -> float:
    vals = [m[key] for m in history[len(history) // 2:]]
    return statistics.fmean(vals)


def oscillation_run(job: tuple[str, str, int, Path]) -> dict:
    """Plain LSQ from FP (a worker job): oscillating fractions per epoch, BN mismatch and test top-1
    before and after BN re-estimation."""
    arch, bits, epochs, work = job
    cfg = TrainConfig(**{**QAT, "quantizer_lr": shipped_quantizer_lr(bits), "arch": arch, "bits": bits,
                         "method": "lsq", "epochs": epochs, "seed": 0,
                         "bn_reestimate_batches": 0, "pretrained": str(work / f"fp-{arch}.pt")})
    t = Trainer(cfg)
    t.fit()
    before = bn_mismatch(t, t.data.val, 20)
    _, top1_before = t.evaluate(t.data.test)
    reestimate_bn(t.model, t._bn_batches(), 20, t.device)
    after = bn_mismatch(t, t.data.val, 20)
    _, top1_after = t.evaluate(t.data.test)
    h = t.history
    row = {"arch": arch, "bits": bits, "epochs": epochs,
           "depthwise": second_half_mean(h, "osc_frac_depthwise"),
           "pointwise": second_half_mean(h, "osc_frac_pointwise"),
           "per_epoch_depthwise": [m["osc_frac_depthwise"] for m in h],
           "per_epoch_pointwise": [m["osc_frac_pointwise"] for m in h],
           "bn_before": before, "bn_after": after,
           "test_top1_before_bnre": top1_before, "test_top1_after_bnre": top1_after}
    log(f"oscillations {arch}/{bits}: dw {row['depthwise']:.4f} pw {row['pointwise']:.4f}; "
        f"test {top1_before:.4f} -> {top1_after:.4f} after BN re-est.")
    return row


def oscillation_section(quick: bool, work: Path, fig_dir: Path) -> dict:
    """Plain LSQ from FP at the shipped quantizer lr: depthwise vs pointwise oscillation (mean over the
    second half of training) and BN re-estimation (mismatch on the selection split, which no
    re-estimation batch comes from; top-1 on the test split)."""
    epochs = size("osc_epochs", quick)
    settings = [(a, b) for a in NETS for b in ("w4a4", "w3a3")]
    rows = run_parallel(oscillation_run, [(a, b, epochs, work) for a, b in settings])
    fig, axes = plt.subplots(1, len(rows), figsize=(4 * len(rows), 3.4))
    for ax, row in zip(axes, rows):
        ax.plot(range(1, epochs + 1), row["per_epoch_depthwise"], "o-", ms=3, label="depthwise")
        ax.plot(range(1, epochs + 1), row["per_epoch_pointwise"], "s-", ms=3, label="pointwise")
        ax.axvspan(epochs / 2, epochs, color="grey", alpha=0.12, lw=0)
        ax.set_title(f"{row['arch']} {row['bits'].upper()} (LSQ)", fontsize=9)
        ax.set_xlabel("epoch")
    axes[0].set_ylabel("fraction of weights oscillating")
    axes[0].legend(fontsize=8)
    fig.suptitle("shaded: second half of training (the table's mean)", fontsize=8)
    fig.tight_layout()
    fig.savefig(fig_dir / "oscillation_fraction.png", dpi=110)
    plt.close(fig)
    return {"epochs": epochs, "rows": rows}


# 3. accuracy per method -----------------------------------------------------------------------
def accuracy_section(quick: bool, work: Path, fig_dir: Path) -> dict:
    seeds = list(range(size("acc_seeds", quick)))
    epochs = size("acc_epochs", quick)
    nets = size("acc_nets", quick)
    keys = [(arch, bits, seed, method) for arch in nets for bits in size("acc_bits", quick)
            for seed in seeds for method in METHODS]
    cfgs = [{**QAT, "quantizer_lr": shipped_quantizer_lr(bits), "arch": arch, "bits": bits, "method": method,
             "epochs": epochs, "seed": seed, "pretrained": str(work / f"fp-{arch}.pt")}
            for arch, bits, seed, method in keys]
    runs: dict[tuple, dict[str, list[float]]] = {}
    for (arch, bits, seed, method), last in zip(keys, run_parallel(train_last, cfgs)):
        r = runs.setdefault((arch, bits), {k: [] for k in LABELS})
        if method == "lsq":
            r["lsq"].append(last["test_top1_no_bnre"])
            r["lsq+bnre"].append(last["test_top1"])
        else:
            r[method].append(last["test_top1"])
        log(f"accuracy {arch} {bits} {method} seed {seed}: test {last['test_top1']:.4f} "
            f"(osc {last['osc_frac']:.3f}, frozen {last['frozen_frac']:.3f})")
    rows = []
    for (arch, bits), r in runs.items():
        for label in LABELS:
            m, s = mean_std(r[label])
            row = {"arch": arch, "bits": bits, "method": label, "seeds": seeds, "test_top1": r[label],
                   "test_top1_mean": m, "test_top1_std": s, "paired_diff_vs_lsq_bnre": None, "paired_diff_ci95": None}
            if label not in ("lsq+bnre",):
                d = paired(r[label], r["lsq+bnre"])
                row.update(paired_diff_vs_lsq_bnre=d["mean"], paired_diff_std=d["std"], paired_diff_ci95=d["ci95"])
            rows.append(row)
    fig, axes = plt.subplots(1, len(nets), figsize=(8 * len(nets), 3.8), squeeze=False)
    for ax, arch in zip(axes[0], nets):
        mine = [r for r in rows if r["arch"] == arch]
        bits_list = size("acc_bits", quick)
        for i, label in enumerate(LABELS):
            sel = [next(r for r in mine if r["bits"] == b and r["method"] == label) for b in bits_list]
            ax.bar([x + (i - 2) * 0.16 for x in range(len(bits_list))], [r["test_top1_mean"] * 100 for r in sel],
                   0.16, yerr=[r["test_top1_std"] * 100 for r in sel], capsize=2, label=label)
        ax.set_xticks(range(len(bits_list)), [b.upper() for b in bits_list])
        ax.set_ylabel("test top-1 (%)")
        lo = min(r["test_top1_mean"] for r in mine) * 100
        ax.set_ylim(max(0, lo - 10), 100)
        ax.set_title(f"{arch} on {DATASET}, {epochs} QAT epochs, mean ± sample std over {len(seeds)} seeds",
                     fontsize=9)
        ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(fig_dir / "accuracy_by_method.png", dpi=110)
    plt.close(fig)
    return {"epochs": epochs, "seeds": seeds, "rows": rows}


# 4. what the search buys -------------------------------------------------------------------------
SEARCH_ARCH, SEARCH_BITS = "demo_net", "w3a3"


def _trial_runs(camp) -> list[dict]:
    """Search-stage child runs of the campaign's target in MLflow, in start order, with the
    epochs each trained, its last selection value and (full-budget trials only) its test top-1."""
    from search.tracking import client_for

    client = client_for(camp.mlflow.tracking_uri)
    exp = client.get_experiment_by_name(camp.experiment_name)
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`oscqat.role` = 'trial'", max_results=10_000)
    out = []
    for run in runs:
        if run.data.tags.get("oscqat.stage", "search") != "search":
            continue
        hist = client.get_metric_history(run.info.run_id, "val_top1")
        out.append({"start": run.info.start_time, "epochs": len(hist), "val_top1": run.data.metrics.get("val_top1"),
                    "test_top1": run.data.metrics.get("test_top1"), "trial_id": run.data.tags.get("oscqat.trial_id")})
    return sorted(out, key=lambda r: r["start"])


def _best_so_far(trials: list[dict]) -> list[tuple[int, float]]:
    """(cumulative trial-epochs, test top-1 of the incumbent) after each trial; the incumbent is the
    best *selection* value among trials that trained to the full budget."""
    points, used, best = [], 0, None
    for t in trials:
        used += t["epochs"]
        if t["test_top1"] is not None and t["val_top1"] is not None and (best is None or t["val_top1"] > best["val_top1"]):
            best = t
        if best is not None:
            points.append((used, best["test_top1"]))
    return points


def _selected_test(trials: list[dict]) -> float | None:
    """Test top-1 of the search's selected trial (best selection value at the full budget)."""
    pts = _best_so_far(trials)
    return pts[-1][1] if pts else None


def _winner_test(res, trials: list[dict]) -> float | None:
    """The confirmed winner's test mean when the campaign confirmed one (``TargetResult.confirmed``,
    as ``run_campaign`` returns it); else the selected trial's test top-1."""
    confirmed = (res.confirmed or {}).get("test_top1_mean")
    return confirmed if confirmed is not None else _selected_test(trials)


def search_section(quick: bool, work: Path, fig_dir: Path, previous: dict | None = None) -> dict:
    """Recipes, random search and TPE + ASHA per campaign seed. ``previous`` (an earlier run's
    section with the same seeds) lends its recipe runs, which do not depend on the search code."""
    import ray

    from search.campaign import Campaign
    from search.runner import run_campaign

    seeds = list(range(size("search_seeds", quick)))
    max_epochs = size("search_epochs", quick)
    fp = work / f"fp-{SEARCH_ARCH}.pt"
    per = {k: [] for k in ("release-dampen", "release-freeze", "adapted-freeze", "random", "tpe_asha")}
    curves = {"random": [], "tpe_asha": []}
    recipes = [(seed, name, recipe) for seed in seeds
               for name, recipe in (*RELEASE.items(), ("adapted-freeze", ADAPTED))]
    old = {r["strategy"]: r for r in (previous or {}).get("rows", [])}
    if previous and previous.get("seeds") == seeds and all(len(old.get(n, {}).get("runs", [])) == len(seeds)
                                                            for _, n, _ in recipes):
        for _, name, _ in recipes[:len(recipes) // len(seeds)]:
            per[name] = old[name]["runs"]
        log("search: recipe runs reused from the previous results.json")
    else:
        cfgs = [{**QAT, "quantizer_lr": shipped_quantizer_lr(SEARCH_BITS), **recipe, "arch": SEARCH_ARCH,
                 "bits": SEARCH_BITS, "epochs": max_epochs, "seed": seed, "pretrained": str(fp)}
                for seed, name, recipe in recipes]
        for (seed, name, _), last in zip(recipes, run_parallel(train_last, cfgs)):
            per[name].append({"test_top1": last["test_top1"], "trial_epochs": max_epochs,
                              "frozen_frac": last["frozen_frac"]})
            log(f"search seed {seed}: {name} test {last['test_top1']:.4f} (frozen {last['frozen_frac']:.4f})")
    for seed in seeds:
        for kind, n, searcher, scheduler in (("random", size("random_trials", quick), "random", "fifo"),
                                             ("tpe_asha", size("tpe_trials", quick), "tpe", "asha")):
            spec = dict(
                name=f"evidence-{kind}-{seed}", dataset=DATASET,
                targets=[{"arch": SEARCH_ARCH, "bits": SEARCH_BITS, "pretrained": str(fp)}],
                base={"bn_reestimate_batches": 20, "batch_size": 64},
                budget={"num_samples": n, "max_epochs": max_epochs, "reduction_factor": 2,
                        "searcher": searcher, "scheduler": scheduler, "enqueue_starting_points": kind == "tpe_asha"},
                resources={"cpu": 1}, seed=seed, storage_path=str(work / "ray"),
                mlflow={"tracking_uri": f"sqlite:///{work}/mlflow.db"}, optuna_storage=f"sqlite:///{work}/optuna.db",
            )
            if "confirm" in Campaign.model_fields:  # the confirm stage: top-k retrained with fresh seeds
                spec["confirm"] = {"top_k": 1, "seeds": 2} if quick else dict(CONFIRM)
            camp = Campaign(**spec)
            t0 = time.perf_counter()
            res = run_campaign(camp)[0]  # with the confirmed winner (target_result alone lacks the state)
            wall = time.perf_counter() - t0
            trials = _trial_runs(camp)
            curves[kind].append(_best_so_far(trials))
            if camp.confirm is not None and res.confirmed is None:
                raise RuntimeError(f"{camp.name}: the confirm stage recorded no winner")
            per[kind].append({"test_top1": _winner_test(res, trials), "trial_epochs": sum(t["epochs"] for t in trials),
                              "trials": len(trials), "wall_s": wall, "best_method": res.method,
                              "selected_val_top1": res.best_val_top1, "selected_test_top1": _selected_test(trials),
                              "confirmed": res.confirmed})
            log(f"search seed {seed}: {kind} winner test {per[kind][-1]['test_top1']} "
                f"with {per[kind][-1]['trial_epochs']} trial-epochs ({wall:.0f} s)")
    ray.shutdown()
    rows = []
    for strategy, rs in per.items():
        tests = [r["test_top1"] for r in rs if r["test_top1"] is not None]
        m, s = mean_std(tests) if tests else (None, None)
        rows.append({"strategy": strategy, "seeds": seeds, "test_top1": tests, "test_top1_mean": m, "test_top1_std": s,
                     "trial_epochs_mean": statistics.fmean(r["trial_epochs"] for r in rs), "runs": rs})
    # TPE + ASHA against each other strategy, paired over the shared campaign seeds
    tpe = [r["test_top1"] for r in per["tpe_asha"]]
    for row in rows:
        other = [r["test_top1"] for r in per[row["strategy"]]]
        ok = row["strategy"] != "tpe_asha" and None not in tpe + other and len(tpe) == len(other) > 1
        row["tpe_minus_this"] = paired(tpe, other) if ok else None
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for i, (kind, cs) in enumerate(curves.items()):
        for j, pts in enumerate(cs):
            if pts:
                ax.step([p[0] for p in pts], [p[1] * 100 for p in pts], where="post", color=f"C{i}", alpha=0.7,
                        label=kind if j == 0 else None)
    for i, name in enumerate(("release-dampen", "release-freeze", "adapted-freeze")):
        row = next(r for r in rows if r["strategy"] == name)
        if row["test_top1_mean"] is not None:
            ax.errorbar([max_epochs], [row["test_top1_mean"] * 100], yerr=[row["test_top1_std"] * 100], fmt="o",
                        color=f"C{i + 2}", capsize=3, label=name)
    ax.set_xlabel("trial-epochs used")
    ax.set_ylabel("test top-1 of the incumbent (%)")
    ax.set_title(f"{SEARCH_ARCH} {SEARCH_BITS.upper()} on {DATASET}: best-so-far (selected on the selection split)",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(fig_dir / "search_best_so_far.png", dpi=110)
    plt.close(fig)
    return {"arch": SEARCH_ARCH, "bits": SEARCH_BITS, "max_epochs": max_epochs, "seeds": seeds, "rows": rows,
            "curves": curves, "tpe_startup_trials": tpe_startup_trials(quick)}


# report ------------------------------------------------------------------------------------------
def pct(m: float | None, s: float | None = None) -> str:
    if m is None:
        return "-"
    return f"{m * 100:.2f}" + (f" ± {s * 100:.2f}" if s else "")


def write_markdown(res: dict, quick: bool, command: str, elapsed: float) -> str:
    b, toy, osc, acc, srch = (res[k] for k in ("benchmark", "toy", "oscillation_detail", "accuracy", "search"))
    lines = [
        "# Results: the paper's findings at laptop scale",
        "",
        f"Generated by `{command}` on {res['machine']} ({res['date']}, {elapsed / 60:.0f} min)."
        + (f" Re-run afterwards with `--sections`: {', '.join(res['rerun'])}." if res.get("rerun") else "")
        + (" **Quick mode: tiny budgets, numbers are not meaningful.**" if quick else ""),
        "Every figure is regenerated by that command. Raw numbers: [results.json](results.json) "
        "(accuracies and fractions in 0..1 there, percent here).",
        "",
        f"Data: `{b['dataset']}` ({b['image_size']} px renderings of scikit-learn's digits, see the README's Data "
        f"section): {b['train']} train, {b['selection']} selection, {b['test']} test images. The search selects on "
        "the selection split; **every accuracy below is on the held-out test split**, which nothing selects on. "
        "FP test top-1: " + ", ".join(f"{a} {pct(v)}%" for a, v in b["fp_test_top1"].items()) + ".",
        "",
        "![samples](figures/digits_hard_samples.png)",
        "",
        "## 1. The toy regression (paper §2.2)",
        "",
        "![toy](figures/toy_trajectories.png)",
        "",
        "| dampening λ | method | integer flips (2nd half) | time-average of q(w) | time in upper state (expected) |",
        "|---|---|---|---|---|",
    ]
    for key, runs in toy.items():
        for m, r in runs.items():
            lines.append(f"| {r['dampen_lambda']} | {m} | {r['flips_second_half']} | {r['time_avg_q_second_half']:.4f} | "
                         f"{r['up_fraction']:.3f} ({r['expected_up_fraction']:.3f}) |")
    lines += ["", "The figure shows λ = 1.0; the paper's λ is 0.1 (both rows above).", "",
              "## 2. Oscillations (depthwise vs pointwise) and BN re-estimation", "",
              "![oscillations](figures/oscillation_fraction.png)", "",
              f"Plain LSQ from the FP checkpoint, {osc['epochs']} epochs, quantizer lr from the demo space's starting points. "
              "Oscillating fraction = mean over the second half of training. BN mismatch measured on the selection "
              "split (disjoint from the training batches BN re-estimation uses); top-1 on the test split.", "",
              "| net / bits | osc. depthwise | osc. pointwise | BN mean shift before → after | "
              "BN log-var ratio before → after | test top-1 before → after |",
              "|---|---|---|---|---|---|"]
    for r in osc["rows"]:
        lines.append(f"| {r['arch']} {r['bits'].upper()} | {r['depthwise']:.4f} | {r['pointwise']:.4f} | "
                     f"{r['bn_before']['mean_shift']:.4f} → {r['bn_after']['mean_shift']:.4f} | "
                     f"{r['bn_before']['log_var_ratio']:.4f} → {r['bn_after']['log_var_ratio']:.4f} | "
                     f"{pct(r['test_top1_before_bnre'])} → {pct(r['test_top1_after_bnre'])} |")
    lines += ["", "## 3. Accuracy by method", "", "![accuracy](figures/accuracy_by_method.png)", "",
              f"{acc['epochs']} QAT epochs from FP, test top-1 (%) mean ± sample std over seeds {acc['seeds']}; "
              "Δ = paired difference to LSQ + BN re-estimation over the same seeds, with its 95% t interval.", "",
              "| net | bits | method | test top-1 | Δ vs lsq+bnre [95% CI] |", "|---|---|---|---|---|"]
    for r in acc["rows"]:
        ci = r["paired_diff_ci95"]
        delta = "-" if ci is None else (f"{r['paired_diff_vs_lsq_bnre'] * 100:+.2f} "
                                        f"[{ci[0] * 100:+.2f}, {ci[1] * 100:+.2f}]")
        lines.append(f"| {r['arch']} | {r['bits'].upper()} | {r['method']} | "
                     f"{pct(r['test_top1_mean'], r['test_top1_std'])} | {delta} |")
    lines += ["", "## 4. What the search buys", "", "![search](figures/search_best_so_far.png)", "",
              f"{srch['arch']} {srch['bits'].upper()}, {srch['max_epochs']} epochs per full trial, campaign seeds "
              f"{srch['seeds']}; test top-1 of the winner (the confirmed winner when the campaign confirms, else "
              "the trial with the best selection value). Release recipes as the release runs them (MobileNetV2 W3: "
              "dampening or freezing, m = 1e-3, f_th 0.1 → 0.011), the freeze recipe adapted to the run length "
              "(m = 0.01), random search (every trial to the full budget), TPE + ASHA.", "",
              "| strategy | test top-1 (%) | trial-epochs (mean) | TPE + ASHA minus this, paired [95% CI] |",
              "|---|---|---|---|"]
    for r in srch["rows"]:
        d = r.get("tpe_minus_this")
        delta = "-" if d is None else f"{d['mean'] * 100:+.2f} [{d['ci95'][0] * 100:+.2f}, {d['ci95'][1] * 100:+.2f}]"
        lines.append(f"| {r['strategy']} | {pct(r['test_top1_mean'], r['test_top1_std'])} | "
                     f"{r['trial_epochs_mean']:.0f} | {delta} |")
    lines += ["", "## Where ours differs from the paper, and why", "", discussion(res), ""]
    return "\n".join(lines)


def discussion(res: dict) -> str:
    """Every sentence computed from the numbers in ``res``."""
    notes = []
    osc = res["oscillation_detail"]["rows"]
    dw = [f"{r['arch']} {r['bits'].upper()}" for r in osc if r["depthwise"] > r["pointwise"]]
    notes.append(f"- Depthwise layers oscillated more than pointwise ones in {len(dw)} of {len(osc)} settings"
                 f" ({', '.join(dw) or 'none'})" + ("; the paper reports it for every MobileNet setting."
                                                    if len(dw) < len(osc) else ", as in the paper."))
    bn = [r for r in osc if r["test_top1_after_bnre"] >= r["test_top1_before_bnre"]]
    notes.append(f"- BN re-estimation did not lower test top-1 in {len(bn)} of {len(osc)} settings and lowered the "
                 f"BN mean shift in {sum(r['bn_after']['mean_shift'] < r['bn_before']['mean_shift'] for r in osc)}.")
    fp = res["benchmark"]["fp_test_top1"]
    for r in res["accuracy"]["rows"]:
        if r["method"] in ("lsq", "lsq+bnre") and r["arch"] in fp:
            notes.append(f"- {r['arch']} {r['bits'].upper()} {r['method']}: {r['test_top1_mean'] * 100:.2f}% test top-1, "
                         f"{abs(fp[r['arch']] - r['test_top1_mean']) * 100:.2f} pt "
                         f"{'below' if r['test_top1_mean'] <= fp[r['arch']] else 'above'} FP ({fp[r['arch']] * 100:.2f}%).")
    for r in res["accuracy"]["rows"]:
        if r["method"] in ("dampen", "freeze", "dampen+freeze") and r["paired_diff_ci95"] is not None:
            lo, hi = r["paired_diff_ci95"]
            if lo > 0:
                verdict = "a gain (95% interval above 0)"
            elif hi < 0:
                verdict = "a loss (95% interval below 0)"
            else:
                verdict = "not distinguishable from 0"
            notes.append(f"- {r['arch']} {r['bits'].upper()} {r['method']}: {r['paired_diff_vs_lsq_bnre'] * 100:+.2f} pt "
                         f"vs LSQ + BN re-est., {verdict}.")
    rows = {r["strategy"]: r for r in res["search"]["rows"]}
    valid = {k: r for k, r in rows.items() if r["test_top1_mean"] is not None}
    if valid:
        best = max(valid, key=lambda k: valid[k]["test_top1_mean"])
        notes.append(f"- Search: the highest mean test top-1 came from {best} "
                     f"({valid[best]['test_top1_mean'] * 100:.2f}%, {valid[best]['trial_epochs_mean']:.0f} "
                     "trial-epochs); " + ", ".join(f"{k} {r['test_top1_mean'] * 100:.2f}"
                                                   for k, r in valid.items() if k != best) + ".")
    for k, r in rows.items():
        d = r.get("tpe_minus_this")
        if d is not None:
            lo, hi = d["ci95"]
            verdict = ("better (95% interval above 0)" if lo > 0 else "worse (95% interval below 0)" if hi < 0
                       else "not distinguishable (95% interval spans 0)")
            notes.append(f"- TPE + ASHA vs {k}: {d['mean'] * 100:+.2f} pt test top-1 paired over {d['n']} campaign "
                         f"seeds [{lo * 100:+.2f}, {hi * 100:+.2f}]: {verdict}.")
    rnd, tpe = rows.get("random", {}).get("runs", []), rows.get("tpe_asha", {}).get("runs", [])
    if rnd and tpe:
        same = sum(a["test_top1"] == b["test_top1"] for a, b in zip(rnd, tpe))
        startup = res["search"].get("tpe_startup_trials", 10)
        trials = max(r.get("trials") or 0 for r in tpe)
        now = tpe_startup_trials(res.get("quick", False))
        notes.append(f"- Random search and TPE + ASHA confirmed a winner with the same test top-1 on {same} of "
                     f"{len(tpe)} campaign seeds. TPE drew its first {startup} trials at random "
                     f"(n_startup_trials) from a random sampler seeded like the random campaign's, and these "
                     f"campaigns ran {trials} TPE trials"
                     + (", so TPE never modelled: its campaigns were the space's starting points plus random "
                        "draws, under ASHA." if trials <= startup else ".")
                     + (f" The product now defaults to {now} start-up trials for this budget "
                        "(`budget.tpe_startup_trials: auto`); that default is not measured here "
                        "(`--sections search` re-runs it)." if now != startup else ""))
    fr = [r["frozen_frac"] for r in rows.get("release-freeze", {}).get("runs", [])]
    if fr:
        notes.append(f"- The release freeze recipe (m = 1e-3) froze a mean {statistics.fmean(fr) * 100:.3f}% of the "
                     "weights in these short runs.")
    return "\n".join(notes)


def tpe_startup_trials(quick: bool = False) -> int:
    """How many trials the evidence campaigns' TPE draws at random first under the current default
    (``budget.tpe_startup_trials: auto``: the space's starting points + 1, or a third of the budget)."""
    from search.campaign import Budget
    from spaces import load_space

    points = load_space(SEARCH_ARCH, SEARCH_BITS).starting_points
    return Budget(num_samples=size("tpe_trials", quick)).startup_trials(len(points))


SECTIONS = ("benchmark", "toy", "oscillation", "accuracy", "search")


def summary(res: dict) -> dict:
    """The stable keys of results.json (issue 14 item 4)."""
    b = res["benchmark"]
    return {
        "units": "fractions in 0..1 (top-1, oscillating fractions, differences)",
        "benchmark": {k: b[k] for k in ("dataset", "image_size", "train", "selection", "test", "fp_test_top1")},
        "methods": [{k: r[k] for k in ("arch", "bits", "method", "seeds", "test_top1_mean", "test_top1_std",
                                       "paired_diff_vs_lsq_bnre", "paired_diff_ci95")}
                    for r in res["accuracy"]["rows"]],
        "oscillation": [{k: r[k] for k in ("arch", "bits", "depthwise", "pointwise")}
                        for r in res["oscillation_detail"]["rows"]],
        "search": [{k: r[k] for k in ("strategy", "seeds", "test_top1_mean", "test_top1_std", "trial_epochs_mean")}
                   for r in res["search"]["rows"]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="every section at tiny size (numbers meaningless)")
    ap.add_argument("--out", type=Path, default=None,
                    help="folder for RESULTS.md, results.json, figures/ (default: docs/; quick: /tmp/oscqat-evidence-quick)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these tiny models)")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes for independent training runs")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help="comma-separated sections to run; the others are taken from the folder's results.json")
    ap.add_argument("--rewrite", action="store_true",
                    help="no training: re-render RESULTS.md from the folder's results.json (after a wording change)")
    args = ap.parse_args()
    if args.rewrite:
        return rewrite(args.out or ROOT / "docs")
    global JOBS
    JOBS = args.jobs
    torch.set_num_threads(args.threads)
    out = args.out or (Path("/tmp/oscqat-evidence-quick") if args.quick else ROOT / "docs")
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    command = "python bench/evidence.py" + (" --quick" if args.quick else "")
    start = time.perf_counter()
    wanted = [x.strip() for x in args.sections.split(",") if x.strip()]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        ap.error(f"--sections: unknown {', '.join(unknown)} (choose from {', '.join(SECTIONS)})")
    res: dict = {"machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread"
                            f"{'' if torch.get_num_threads() == 1 else 's'}, {JOBS} worker processes",
                 "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "quick": args.quick, "section_s": {}}
    previous: dict = {}
    if set(wanted) != set(SECTIONS):
        if not (out / "results.json").is_file():
            ap.error(f"--sections: {out / 'results.json'} is missing, so the other sections cannot be reused")
        previous = json.loads((out / "results.json").read_text())
        res = {**previous, "section_s": dict(previous.get("section_s", {}))}
        res["search"] = previous.get("search_detail", previous.get("search"))
        res["rerun"] = sorted(set(res.get("rerun", [])) | set(wanted))
    with tempfile.TemporaryDirectory(prefix="oscqat-evidence-") as tmp:
        work = Path(tmp)
        if "benchmark" not in wanted:  # the later sections start from the FP checkpoints
            run_parallel(fp_checkpoint, [(arch, args.quick, work) for arch in NETS])
        for name in (n for n in SECTIONS if n in wanted):
            log(f"section {name}")
            t0 = time.perf_counter()
            if name == "toy":
                res["toy"] = toy_section(args.quick, fig_dir)
            elif name == "oscillation":
                res["oscillation_detail"] = oscillation_section(args.quick, work, fig_dir)
            elif name == "search":
                res["search"] = search_section(args.quick, work, fig_dir, previous.get("search_detail"))
            else:
                fn = {"benchmark": benchmark_section, "accuracy": accuracy_section}[name]
                res[name] = fn(args.quick, work, fig_dir)
            res["section_s"][name] = time.perf_counter() - t0
    res.update(summary(res) | {"accuracy": res["accuracy"], "search_detail": res["search"]})
    res["discussion"] = discussion({**res, "search": res["search_detail"]})
    res["elapsed_s"] = sum(res["section_s"].values()) if previous else time.perf_counter() - start
    md = write_markdown({**res, "search": res["search_detail"]}, args.quick, command, res["elapsed_s"])
    (out / "results.json").write_text(json.dumps(res, indent=1, default=float))
    (out / "RESULTS.md").write_text(md)
    log(f"wrote {out / 'RESULTS.md'} and results.json; section times (s): "
        + ", ".join(f"{k} {v:.0f}" for k, v in res["section_s"].items()))


def rewrite(out: Path) -> None:
    """RESULTS.md (and the discussion in results.json) again from the numbers in results.json."""
    res = json.loads((out / "results.json").read_text())
    full = {**res, "search": res["search_detail"]}
    res["discussion"] = discussion(full)
    elapsed = res.get("elapsed_s") or sum(res["section_s"].values())
    command = "python bench/evidence.py" + (" --quick" if res.get("quick") else "")
    (out / "RESULTS.md").write_text(write_markdown(full, res.get("quick", False), command, elapsed))
    (out / "results.json").write_text(json.dumps(res, indent=1, default=float))
    log(f"rewrote {out / 'RESULTS.md'} from results.json")


if __name__ == "__main__":
    main()
