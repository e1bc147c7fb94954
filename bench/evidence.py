"""Reproduce the paper's findings at laptop scale and write docs/RESULTS.md (issue: evidence).

Everything goes through the project's own API (oscqat Trainer, toy, search.runner). Figures
land in docs/figures/, raw numbers in docs/results.json. About an hour on 2 CPU cores:

    .venv/bin/python bench/evidence.py            # full run, rewrites docs/RESULTS.md
    .venv/bin/python bench/evidence.py --quick    # minutes: tiny budgets, to check the pipeline
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from oscqat import TrainConfig, Trainer  # noqa: E402
from oscqat.bn import bn_layers, reestimate_bn  # noqa: E402
from oscqat.toy import run_toy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FIG = DOCS / "figures"
METHODS = ("lsq", "dampen", "freeze", "dampen+freeze")
# Shared QAT hyper-parameters for the demo net on digits (from an FP checkpoint).
DEMO_QAT = dict(arch="demo_net", dataset="digits", batch_size=64, lr=0.02, weight_decay=5e-5, quantizer_lr=1e-3,
                osc_momentum=0.01, dampen_lambda=0.1, freeze_threshold_start=0.1, freeze_threshold_end=0.011,
                bn_reestimate_batches=20)


def log(msg: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


def fp_checkpoint(arch: str, seed: int, epochs: int, out: Path, **extra) -> Path:
    path = out / f"fp-{arch}-{seed}.pt"
    if not path.exists():
        cfg = TrainConfig(arch=arch, bits="fp32", dataset="digits", epochs=epochs, lr=0.05, weight_decay=5e-4,
                          seed=seed, bn_reestimate_batches=0, **extra)
        t = Trainer(cfg)
        t.fit()
        log(f"FP {arch} seed {seed}: val_top1 {t.history[-1]['val_top1']:.4f}")
        t.save_model(path)
    return path


# 1. toy regression -----------------------------------------------------------------
def toy_section(quick: bool) -> dict:
    steps = 600 if quick else 3000
    runs = {m: run_toy(w_star=0.234, method=m, steps=steps, lr=0.05, scale=0.1, seed=0) for m in ("lsq", "dampen", "freeze")}
    import numpy as np

    fig, axes = plt.subplots(2, 3, figsize=(13, 6), sharey="row")
    window = 100
    for col, (m, r) in enumerate(runs.items()):
        ax = axes[1, col]  # zoom: 60 steps of raw q(w), where the flipping is visible
        ax.step(range(60), r.q[:60], where="post", lw=0.9, color="C1", label="q(w)")
        ax.plot(r.latent[:60], lw=0.9, color="C0", label="latent w")
        ax.axhline(r.threshold, color="grey", ls=":", lw=0.8)
        ax.set_xlabel("step (first 60)")
        ax = axes[0, col]
        ax.plot(r.latent, lw=0.8, label="latent w")
        ax.plot(np.convolve(r.q, np.ones(window) / window, mode="valid"), lw=1.2,
                label=f"q(w), mean over {window} steps")
        ax.axhline(r.w_star, color="k", ls="--", lw=0.8, label="w*")
        ax.axhline(r.threshold, color="grey", ls=":", lw=0.8, label="rounding threshold")
        ax.set_title(m)
        ax.set_xlabel("step")
    axes[0, 0].set_ylabel("weight")
    axes[1, 0].set_ylabel("weight")
    axes[0, 0].legend(fontsize=7, loc="lower right")
    axes[1, 0].legend(fontsize=7, loc="lower right")
    fig.suptitle("Toy regression: one latent weight, grid step 0.1, w* = 0.234")
    fig.tight_layout()
    fig.savefig(FIG / "toy_trajectories.png", dpi=110)
    plt.close(fig)
    half = steps // 2
    return {m: {"flips_second_half": r.flips(start=half), "time_avg_q_second_half": r.time_average_q(start=half),
                "up_fraction": r.up_fraction(start=half), "expected_up_fraction": r.expected_up_fraction,
                "final_q": float(r.q[-1]), "final_latent": float(r.latent[-1])} for m, r in runs.items()}


# 2. oscillations and BN statistics ---------------------------------------------------
@torch.no_grad()
def bn_mismatch(trainer: Trainer, batches: int) -> dict:
    """Population statistics of each BN input (inference-mode network over training data) vs running stats."""
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
    loader = trainer.data.train
    loader.set_epoch(123_457)
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


def oscillation_section(quick: bool, work: Path) -> dict:
    out = {}
    setups = [("demo_net", {}, 6 if quick else 10, 3 if quick else 15),
              ("mobilenet_v2", {"image_size": 32}, 2 if quick else 8, 2 if quick else 10)]
    fig, axes = plt.subplots(1, 2 * len(setups), figsize=(16, 3.6))
    col = 0
    for arch, extra, fp_epochs, epochs in setups:
        fp = fp_checkpoint(arch, 0, fp_epochs, work, **extra)
        for bits in ("w4a4", "w3a3"):
            cfg = TrainConfig(arch=arch, bits=bits, dataset="digits", epochs=epochs, lr=0.01, weight_decay=5e-5,
                              quantizer_lr=1e-3, osc_momentum=0.01, method="lsq", bn_reestimate_batches=0,
                              pretrained=str(fp), seed=0, **extra)
            t = Trainer(cfg)
            t.fit()
            before = bn_mismatch(t, 20)
            _, top1_before = t.evaluate()
            reestimate_bn(t.model, t._bn_batches(), 20, t.device)
            after = bn_mismatch(t, 20)
            _, top1_after = t.evaluate()
            h = t.history
            out[f"{arch}/{bits}"] = {
                "epochs": [m["epoch"] for m in h],
                "osc_depthwise": [m["osc_frac_depthwise"] for m in h],
                "osc_pointwise": [m["osc_frac_pointwise"] for m in h],
                "bn_before": before, "bn_after": after,
                "top1_before_bnre": top1_before, "top1_after_bnre": top1_after,
            }
            ax = axes[col]
            ax.plot(out[f"{arch}/{bits}"]["epochs"], out[f"{arch}/{bits}"]["osc_depthwise"], "o-", label="depthwise")
            ax.plot(out[f"{arch}/{bits}"]["epochs"], out[f"{arch}/{bits}"]["osc_pointwise"], "s-", label="pointwise")
            ax.set_title(f"{arch} {bits.upper()} (LSQ)", fontsize=9)
            ax.set_xlabel("epoch")
            col += 1
            log(f"oscillations {arch}/{bits}: top1 {top1_before:.4f} -> {top1_after:.4f} after BN re-est.")
    axes[0].set_ylabel("fraction of weights oscillating")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(FIG / "oscillation_fraction.png", dpi=110)
    plt.close(fig)
    return out


# 3. accuracy per method ---------------------------------------------------------------
def accuracy_section(quick: bool, work: Path) -> dict:
    seeds = (0, 1) if quick else (0, 1, 2)
    bits_list = ("w4a4", "w3a3", "w2a2")
    epochs = 3 if quick else 15
    rows: dict[str, dict[str, list[float]]] = {}
    for seed in seeds:
        fp = fp_checkpoint("demo_net", seed, 3 if quick else 10, work)
        for bits in bits_list:
            for method in METHODS:
                cfg = TrainConfig(**{**DEMO_QAT, "bits": bits, "method": method, "epochs": epochs, "seed": seed,
                                     "pretrained": str(fp)})
                last = Trainer(cfg).fit()[-1]
                r = rows.setdefault(bits, {})
                if method == "lsq":
                    r.setdefault("LSQ", []).append(last["val_top1_no_bnre"])
                    r.setdefault("LSQ + BN re-est.", []).append(last["val_top1"])
                else:
                    label = {"dampen": "dampen", "freeze": "freeze", "dampen+freeze": "dampen + freeze"}[method]
                    r.setdefault(label, []).append(last["val_top1"])
                log(f"accuracy {bits} {method} seed {seed}: {last['val_top1']:.4f} (osc {last['osc_frac']:.3f}, "
                    f"frozen {last['frozen_frac']:.3f})")
    labels = ["LSQ", "LSQ + BN re-est.", "dampen", "freeze", "dampen + freeze"]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.16
    for i, label in enumerate(labels):
        means = [statistics.fmean(rows[b][label]) * 100 for b in bits_list]
        stds = [statistics.pstdev(rows[b][label]) * 100 for b in bits_list]
        ax.bar([x + (i - 2) * width for x in range(len(bits_list))], means, width, yerr=stds, capsize=2, label=label)
    ax.set_xticks(range(len(bits_list)), [b.upper() for b in bits_list])
    ax.set_ylabel("val top-1 (%)")
    lo = min(min(v) for r in rows.values() for v in r.values()) * 100
    ax.set_ylim(max(0, lo - 5), 100)
    ax.legend(fontsize=7, ncol=3)
    ax.set_title(f"demo net on digits, {epochs} QAT epochs from FP, mean ± std over {len(seeds)} seeds")
    fig.tight_layout()
    fig.savefig(FIG / "accuracy_by_method.png", dpi=110)
    plt.close(fig)
    return {"epochs": epochs, "seeds": list(seeds), "rows": rows}


# 4. what the search buys ---------------------------------------------------------------
RELEASE_RECIPE_W3 = dict(method="dampen+freeze", lr=0.01, weight_decay=2.5e-5, quantizer_lr=1e-5, dampen_lambda=0.1,
                         freeze_threshold_start=0.1, freeze_threshold_end=0.011, osc_momentum=1e-3, dampen_start=0.25,
                         freeze_start=0.25)


def search_section(quick: bool, work: Path) -> dict:
    from search.campaign import Campaign
    from search.runner import target_result

    import optuna
    import ray

    seeds = (0,) if quick else (0, 1, 2)
    max_epochs = 3 if quick else 8
    n_random = 3 if quick else 8
    n_tpe = 6 if quick else 20
    results = {"recipe": [], "random": [], "tpe_asha": []}
    for seed in seeds:
        fp = fp_checkpoint("demo_net", seed, 3 if quick else 10, work)
        recipe = TrainConfig(**{**DEMO_QAT, **RELEASE_RECIPE_W3, "bits": "w3a3", "epochs": max_epochs, "seed": seed,
                                "pretrained": str(fp)})
        last = Trainer(recipe).fit()[-1]
        results["recipe"].append({"best": last["val_top1"], "trial_epochs": max_epochs})
        log(f"search seed {seed}: release recipe untuned {last['val_top1']:.4f}")
        for kind, n, searcher, scheduler in (("random", n_random, "random", "fifo"), ("tpe_asha", n_tpe, "tpe", "asha")):
            camp = Campaign(
                name=f"evidence-{kind}-{seed}", dataset="digits",
                targets=[{"arch": "demo_net", "bits": "w3a3", "pretrained": str(fp)}],
                base={"bn_reestimate_batches": 20, "batch_size": 64},
                budget={"num_samples": n, "max_epochs": max_epochs, "grace_period": 1, "reduction_factor": 2,
                        "searcher": searcher, "scheduler": scheduler,
                        "enqueue_starting_points": kind == "tpe_asha"},
                resources={"cpu": 1}, seed=seed, storage_path=str(work / "ray"),
                mlflow={"tracking_uri": f"sqlite:///{work}/mlflow.db"}, optuna_storage=f"sqlite:///{work}/optuna.db",
            )
            from search.runner import run_campaign

            t0 = time.perf_counter()
            run_campaign(camp)
            wall = time.perf_counter() - t0
            study = optuna.load_study(study_name=camp.study_name(camp.targets[0]), storage=camp.optuna_storage)
            epochs_used = sum(len(t.intermediate_values) for t in study.trials)
            res = target_result(camp, camp.targets[0])
            results[kind].append({"best": res.best_val_top1, "trial_epochs": epochs_used, "trials": len(study.trials),
                                  "wall_s": wall, "best_method": res.method})
            log(f"search seed {seed}: {kind} best {res.best_val_top1:.4f} with {epochs_used} trial-epochs")
    ray.shutdown()
    return {"max_epochs": max_epochs, "seeds": list(seeds), "results": results}


# report ----------------------------------------------------------------------------------------
def pct(values: list[float]) -> str:
    m = statistics.fmean(values) * 100
    s = statistics.pstdev(values) * 100 if len(values) > 1 else 0.0
    return f"{m:.2f} ± {s:.2f}"


def write_markdown(res: dict, quick: bool, command: str, elapsed: float) -> str:
    toy, osc, acc, srch = res["toy"], res["oscillation"], res["accuracy"], res["search"]
    lines = [
        "# Results: the paper's findings at laptop scale",
        "",
        f"Generated by `{command}` on {res['machine']} ({res['date']}, {elapsed / 60:.0f} min)."
        + (" **Quick mode: tiny budgets, numbers are not meaningful.**" if quick else ""),
        "Every figure below is regenerated by that command. Raw numbers: [results.json](results.json).",
        "Data: scikit-learn's bundled digits (8x8, 1,797 images, 10 classes; 80/20 train/val split by seed). "
        "Accuracies are on the validation split, which is also what the search selects on, so the search numbers "
        "are optimistic by the usual selection bias; the ImageNet-scale numbers of the paper are not reproduced here.",
        "",
        "## 1. The toy regression (paper §2.2)",
        "",
        "![toy](figures/toy_trajectories.png)",
        "",
        "| method | integer flips (2nd half) | time-average of q(w) | fraction of time in upper state (expected) | final q(w) |",
        "|---|---|---|---|---|",
    ]
    for m, r in toy.items():
        lines.append(f"| {m} | {r['flips_second_half']} | {r['time_avg_q_second_half']:.4f} | "
                     f"{r['up_fraction']:.3f} ({r['expected_up_fraction']:.3f}) | {r['final_q']:.2f} |")
    lines += [
        "",
        "Paper: under the STE the latent weight oscillates around the rounding threshold between the two grid "
        "points that bracket w*, and the time-average of q(w) approaches w*; dampening and freezing stop it. "
        "Ours agrees: plain LSQ keeps flipping with a time average close to w* = 0.234, while dampening and "
        "freezing end with (almost) no flips, freezing on the grid point the weight held most of the time.",
        "",
        "## 2. Oscillations in depthwise vs pointwise layers, and BN statistics",
        "",
        "![oscillations](figures/oscillation_fraction.png)",
        "",
        "Fraction of (non-frozen) weights whose oscillation-frequency EMA exceeds 2m (m = 0.01: more than about two "
        "oscillations in the last ~100 steps), plain LSQ, from an FP checkpoint.",
        "",
        "| model / bits | final osc. depthwise | final osc. pointwise | BN mean shift before → after re-est. | BN log-var ratio before → after | top-1 before → after re-est. |",
        "|---|---|---|---|---|---|",
    ]
    for key, r in osc.items():
        lines.append(
            f"| {key} | {r['osc_depthwise'][-1]:.4f} | {r['osc_pointwise'][-1]:.4f} | "
            f"{r['bn_before']['mean_shift']:.4f} → {r['bn_after']['mean_shift']:.4f} | "
            f"{r['bn_before']['log_var_ratio']:.4f} → {r['bn_after']['log_var_ratio']:.4f} | "
            f"{r['top1_before_bnre'] * 100:.2f} → {r['top1_after_bnre'] * 100:.2f} |")
    lines += [
        "",
        "BN mismatch = mean over BN layers and channels of |running mean − population mean| / population std, and of "
        "|log(running var / population var)|, with population statistics of each BN input measured in inference "
        "mode over 20 training batches.",
        "",
        "Paper: oscillations are far more frequent in depthwise layers, and they corrupt BN running statistics, "
        "which BN re-estimation repairs (MobileNetV2 W3 weights-only 64.97 → 69.50).",
        "",
        "## 3. Accuracy by method",
        "",
        "![accuracy](figures/accuracy_by_method.png)",
        "",
        f"Demo net, {acc['epochs']} QAT epochs from an FP checkpoint, val top-1 (%) mean ± std over seeds {acc['seeds']}.",
        "",
        "| bits | LSQ | LSQ + BN re-est. | dampen | freeze | dampen + freeze |",
        "|---|---|---|---|---|---|",
    ]
    for bits, r in acc["rows"].items():
        lines.append(f"| {bits.upper()} | " + " | ".join(pct(r[k]) for k in
                     ("LSQ", "LSQ + BN re-est.", "dampen", "freeze", "dampen + freeze")) + " |")
    lines += [
        "",
        "Paper (ImageNet, MobileNetV2 W3A3): LSQ 65.3, + dampen 67.8, + freeze 67.6; the gains grow as bits drop.",
        "",
        "## 4. What the search buys",
        "",
        f"Demo net W3A3, up to {srch['max_epochs']} epochs per trial, seeds {srch['seeds']}. "
        "(a) the paper's release recipe (MobileNetV2 W3: lr 0.01, wd 2.5e-5, quantizer lr 1e-5, λ 0.1, "
        "f_th 0.1 → 0.011, m 1e-3) untuned; (b) random search, every trial to the full budget (FIFO); "
        "(c) TPE + ASHA with the space's starting points enqueued.",
        "",
        "| strategy | best val top-1 (%) | trial-epochs used (mean) | trials (mean) |",
        "|---|---|---|---|",
    ]
    names = {"recipe": "(a) release recipe, untuned", "random": "(b) random search, no early stopping",
             "tpe_asha": "(c) TPE + ASHA"}
    for key, label in names.items():
        rs = srch["results"][key]
        best = [r["best"] for r in rs if r["best"] is not None]
        lines.append(f"| {label} | {pct(best) if best else '-'} | "
                     f"{statistics.fmean(r['trial_epochs'] for r in rs):.0f} | "
                     f"{statistics.fmean(r.get('trials', 1) for r in rs):.1f} |")
    lines += ["", "## Where ours differs from the paper, and why", "", res.get("discussion", "(see the numbers above)"), ""]
    return "\n".join(lines)


def discussion(res: dict) -> str:
    acc = res["accuracy"]["rows"]
    osc = res["oscillation"]
    notes = []
    dw_gt_pw = [k for k, r in osc.items() if r["osc_depthwise"][-1] > r["osc_pointwise"][-1]]
    lead = "As in the paper, depthwise" if 2 * len(dw_gt_pw) > len(osc) else "Unlike the paper, depthwise"
    notes.append(f"- {lead} layers oscillate more than pointwise ones in only {len(dw_gt_pw)} of {len(osc)} "
                 f"settings ({', '.join(dw_gt_pw) or 'none'}) at the end of training. The paper's claim is "
                 "about ImageNet-trained MobileNets with thousands of steps per epoch; our nets are tiny, see "
                 "a few hundred steps, and have few depthwise weights, so the per-layer statistics are noisier.")
    gains = []
    for bits, r in acc.items():
        base = statistics.fmean(r["LSQ + BN re-est."])
        best = max(statistics.fmean(r[k]) for k in ("dampen", "freeze", "dampen + freeze"))
        gains.append(f"{bits.upper()} {100 * (best - base):+.2f} pt")
    notes.append("- Best remedy vs LSQ + BN re-estimation: " + ", ".join(gains) + ". Digits is an easy task "
                 "(the FP net is near 98%), so at 4 bits there is little left to recover; differences smaller "
                 "than the seed std are not evidence either way.")
    bnre = []
    for bits, r in acc.items():
        bnre.append(f"{bits.upper()} {100 * (statistics.fmean(r['LSQ + BN re-est.']) - statistics.fmean(r['LSQ'])):+.2f} pt")
    notes.append("- BN re-estimation alone: " + ", ".join(bnre) + " over plain LSQ.")
    s = res["search"]["results"]
    if s["tpe_asha"] and s["random"]:
        t = statistics.fmean(r["best"] for r in s["tpe_asha"] if r["best"] is not None)
        rnd = statistics.fmean(r["best"] for r in s["random"] if r["best"] is not None)
        rec = statistics.fmean(r["best"] for r in s["recipe"])
        t_ep = statistics.fmean(r["trial_epochs"] for r in s["tpe_asha"])
        r_ep = statistics.fmean(r["trial_epochs"] for r in s["random"])
        if t > max(rnd, rec):
            verdict = "TPE + ASHA found the best configuration"
        elif t == max(rnd, rec):
            verdict = "TPE + ASHA tied with the best of the others"
        else:
            verdict = "TPE + ASHA did not beat " + ("random search" if rnd > t else "the untuned recipe")
        notes.append(f"- Search: TPE + ASHA {100 * t:.2f}% ({t_ep:.0f} trial-epochs) vs random search "
                     f"{100 * rnd:.2f}% ({r_ep:.0f} trial-epochs) vs the untuned release recipe {100 * rec:.2f}%: "
                     f"{verdict}. On digits every reasonable configuration lands within about a point of the "
                     "others, so the spread between strategies is of the order of the seed-to-seed noise; the "
                     "release recipe was tuned for ImageNet-scale runs (m = 1e-3 over hundreds of thousands of "
                     "steps, quantizer lr 1e-5), and on a few hundred steps its freezing barely triggers.")
    return "\n".join(notes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny budgets to check the pipeline (numbers meaningless)")
    ap.add_argument("--only", choices=("toy", "oscillation", "accuracy", "search"), action="append")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is fastest for these tiny models, and robust on a busy machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    FIG.mkdir(parents=True, exist_ok=True)
    command = "python bench/evidence.py" + (" --quick" if args.quick else "")
    start = time.perf_counter()
    res_path = DOCS / "results.json"
    res = json.loads(res_path.read_text()) if (args.only and res_path.exists()) else {}
    res.update(machine=f"{platform.machine()}, {torch.get_num_threads()} torch thread"
                       f"{'' if torch.get_num_threads() == 1 else 's'}",
               date=datetime.now(timezone.utc).strftime("%Y-%m-%d"))
    sections = args.only or ["toy", "oscillation", "accuracy", "search"]
    with tempfile.TemporaryDirectory(prefix="oscqat-evidence-") as tmp:
        work = Path(tmp)
        for name in sections:
            log(f"section {name}")
            fn = {"toy": toy_section, "oscillation": oscillation_section, "accuracy": accuracy_section,
                  "search": search_section}[name]
            res[name] = fn(args.quick) if name == "toy" else fn(args.quick, work)
            res_path.write_text(json.dumps(res, indent=1, default=float))
    missing = [s for s in ("toy", "oscillation", "accuracy", "search") if s not in res]
    if missing:
        log(f"partial results in {res_path}; RESULTS.md needs the sections {missing} too")
        return
    res["discussion"] = discussion(res)
    res_path.write_text(json.dumps(res, indent=1, default=float))
    (DOCS / "RESULTS.md").write_text(write_markdown(res, args.quick, command, time.perf_counter() - start))
    log(f"wrote {DOCS / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
