"""PNG figures of a campaign (matplotlib, Agg backend: no display needed).

Each maker returns a ``Figure``: the PNG it wrote, or a note saying why there is none (too few
trials, no paper numbers, a missing artifact), so the HTML report can show one or the other.
"""

from __future__ import annotations

import json
import re
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from reports.paper import PAPER_FP_TOP1, PAPER_SOURCE, paper_numbers  # noqa: E402
from reports.store import CampaignStore, TrialRecord  # noqa: E402

MIN_TRIALS_FOR_IMPORTANCE = 4
TRUSTED_TRIALS_FOR_IMPORTANCE = 20  # fewer COMPLETE trials: the figure is drawn with a caveat
METHOD_ORDER = ("lsq", "dampen", "freeze", "dampen+freeze")
METHOD_COLORS = {"lsq": "tab:gray", "dampen": "tab:blue", "freeze": "tab:orange", "dampen+freeze": "tab:green"}
DPI = 100


@dataclass
class Figure:
    key: str
    title: str
    file: str | None = None  # PNG file name inside the output directory
    note: str | None = None  # why there is no figure, or a caveat about the one there is
    caption: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def _save(fig, out_dir: Path, name: str) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_dir / name, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return name


def _bits_key(bits: str) -> tuple[int, int]:
    from oscqat.config import parse_bits

    w, a = parse_bits(bits)
    return (w or 32, a or 32)


# Optuna plots ---------------------------------------------------------------------------------
@contextmanager
def _optuna_quiet():
    """Optuna's matplotlib plots are 'experimental' and warn on every call."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)
        yield


def _complete(study) -> list:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if study is not None else []


def _axes_figure(ax):
    import numpy as np

    return np.ravel(ax)[0].figure if isinstance(ax, np.ndarray) else ax.figure


def optuna_figures(study, label: str, out_dir: Path) -> list[Figure]:
    """Optimisation history, parameter importances, parallel coordinates and slices of one study."""
    from optuna.visualization import matplotlib as ovm

    s = slug(label)
    figs = [Figure("history", f"Optimisation history ({label})", caption="final val_top1 of each COMPLETE trial "
                   "(ASHA-pruned trials are PRUNED in Optuna and not shown) and the best so far"),
            Figure("importances", f"Parameter importances ({label})",
                   caption="Optuna's default importance evaluator on the COMPLETE trials"),
            Figure("parallel", f"Parallel coordinates ({label})",
                   caption="params every COMPLETE trial has (conditional params are in the slice plot)"),
            Figure("slice", f"Slice plot ({label})", caption="final val_top1 against each sampled param")]
    complete = _complete(study)
    if study is None:
        for f in figs:
            f.note = "no Optuna study found for this target"
        return figs
    if not complete:
        for f in figs:
            f.note = "no COMPLETE trials yet"
        return figs
    with _optuna_quiet():
        figs[0] = _optuna_one(figs[0], lambda: ovm.plot_optimization_history(study), out_dir, f"{s}-history.png")
        figs[1] = _importances(study, complete, figs[1], out_dir, f"{s}-importances.png")
        common = sorted(set.intersection(*(set(t.params) for t in complete)))
        if len(complete) < 2:
            figs[2].note = figs[3].note = f"only {len(complete)} COMPLETE trial: nothing to compare yet"
        else:
            figs[2] = _optuna_one(figs[2], lambda: ovm.plot_parallel_coordinate(study, params=common or None),
                                  out_dir, f"{s}-parallel.png")
            figs[3] = _optuna_one(figs[3], lambda: ovm.plot_slice(study), out_dir, f"{s}-slice.png", wide=True)
    return figs


def _optuna_one(fig: Figure, make, out_dir: Path, name: str, wide: bool = False) -> Figure:
    try:
        ax = make()
    except Exception as exc:  # noqa: BLE001 - one failing plot must not sink the report
        plt.close("all")
        fig.note = f"Optuna could not draw this plot: {exc.__class__.__name__}: {str(exc)[:200]}"
        return fig
    mfig = _axes_figure(ax)
    import numpy as np

    if isinstance(ax, np.ndarray):
        mfig.suptitle(fig.title)
    else:
        for loc in ("left", "right"):  # Optuna titles some plots on the left: one title, ours
            ax.set_title("", loc=loc)
        ax.set_title(fig.title)
    if wide:
        n = np.size(ax)
        mfig.set_size_inches(min(3.0 * n + 1, 30), 4.2)
        for a in np.ravel(ax):
            _declutter(a.xaxis)
            a.tick_params(axis="x", labelrotation=35, labelsize=7)
    if fig.key == "parallel":  # one twin y axis per param: room between them, few short labels
        mfig.set_size_inches(min(1.9 * len(mfig.axes) + 2, 30), 4.8)
        for a in mfig.axes:
            _declutter(a.yaxis)
            a.tick_params(axis="y", labelsize=7)
    fig.file = _save(mfig, out_dir, name)
    return fig


def _declutter(axis, ticks: int = 4) -> None:
    """At most ``ticks`` labelled ticks on a numeric axis and no labelled minor ticks on a log one
    (Optuna's defaults overlap: ``5x10^-2`` labels every few pixels). Category axes are left alone."""
    from matplotlib.ticker import FixedLocator, FormatStrFormatter, LogLocator, MaxNLocator, NullFormatter

    from matplotlib.category import StrCategoryLocator

    if isinstance(axis.get_major_locator(), (FixedLocator, StrCategoryLocator)):
        return
    lo, hi = sorted(axis.get_view_interval())
    if axis.get_scale() == "log" and lo > 0 and hi / lo >= 10:
        axis.set_major_locator(LogLocator(numticks=ticks))
    else:  # linear, or log within one decade (no power of ten inside to label)
        axis.set_major_locator(MaxNLocator(nbins=ticks - 1))
        axis.set_major_formatter(FormatStrFormatter("%.3g"))
    axis.set_minor_formatter(NullFormatter())


def _importances(study, complete: list, fig: Figure, out_dir: Path, name: str) -> Figure:
    import optuna
    from optuna.visualization import matplotlib as ovm

    varying = [p for p in {k for t in complete for k in t.params}
               if len({repr(t.params.get(p)) for t in complete}) > 1]
    if len(complete) < MIN_TRIALS_FOR_IMPORTANCE or not varying:
        fig.note = (f"too few trials for parameter importances: {len(complete)} COMPLETE trial(s) "
                    f"(need at least {MIN_TRIALS_FOR_IMPORTANCE}, with params that vary)")
        return fig
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            optuna.importance.get_param_importances(study)
        except Exception as exc:  # noqa: BLE001
            fig.note = f"Optuna could not compute importances: {exc.__class__.__name__}: {str(exc)[:200]}"
            return fig
    fig = _optuna_one(fig, lambda: ovm.plot_param_importances(study), out_dir, name)
    notes = []
    if len(complete) < TRUSTED_TRIALS_FOR_IMPORTANCE and fig.file:
        notes.append(f"caution: computed from only {len(complete)} COMPLETE trials; below about "
                     f"{TRUSTED_TRIALS_FOR_IMPORTANCE} the ranking is noise-dominated, read it as a hint only")
    shaky = [w for w in caught if "less than 2 trials" in str(w.message)]
    if shaky and fig.file:
        notes.append(f"for {len(shaky)} param(s) some regimes have fewer than 2 trials, so Optuna says "
                     f"their importance may be inaccurate")
    if notes:
        fig.note = "; ".join(notes)
    return fig


# our own plots --------------------------------------------------------------------------------
SELECTED_SHOWN = "selected on val_top1, shown: held-out test top-1"  # what every accuracy figure plots


def _test_top1(rec: TrialRecord | None) -> float:
    """The held-out test top-1 of a (val-selected) trial, in %; NaN when it has none."""
    return rec.final["test_top1"] * 100 if rec is not None and "test_top1" in rec.final else float("nan")


def accuracy_vs_bits(store: CampaignStore, out_dir: Path) -> list[Figure]:
    """Per method the trial with the best final val_top1, plotted at its *test* top-1 (select on one
    split, show another), against bit-width; the confirmed winner's test mean ± sample std where the
    target confirmed; one figure per architecture, the paper beside."""
    figs = []
    archs = sorted({t.arch for t in store.targets})
    for arch in archs:
        targets = sorted((t for t in store.targets if t.arch == arch), key=lambda t: _bits_key(t.bits))
        xs = [t.bits for t in targets]
        paper = paper_numbers(arch)
        fig = Figure("accuracy_vs_bits", f"Accuracy vs bit-width: {arch}")
        mfig, ax = plt.subplots(figsize=(6.4, 4.2))
        drawn = False
        for method in METHOD_ORDER:
            ys = [_test_top1(store.best(t, lambda r, m=method: r.method == m)) for t in targets]
            if any(y == y for y in ys):
                ax.plot(range(len(xs)), ys, "o-", color=METHOD_COLORS[method], label=f"ours: {method}")
                drawn = True
            if paper:
                pys = [paper.get(b, {}).get(method, float("nan")) for b in xs]
                if any(y == y for y in pys):
                    ax.plot(range(len(xs)), pys, "s--", mfc="none", color=METHOD_COLORS[method],
                            label=f"paper: {method}")
        confirmed = False
        for i, t in enumerate(targets):
            winner = store.confirmed(t)[0]
            if winner is None or winner.test_mean is None:
                continue
            ax.errorbar([i + 0.08], [winner.test_mean * 100], yerr=[(winner.test_std or 0.0) * 100], fmt="D",
                        color="black", mfc="white", capsize=4, zorder=4,
                        label=None if confirmed else "ours: confirmed winner (test mean ± sample std)")
            confirmed = drawn = True
        fp = fp_baseline(store, arch, split="test")
        fp_split = "test"
        if fp is None:
            fp, fp_split = fp_baseline(store, arch), "val"
        if fp is not None:
            ax.axhline(fp * 100, color="black", ls=":", lw=1.2, label=f"ours: FP baseline ({fp_split} {fp * 100:.2f})")
            drawn = True
        ax.set_xticks(range(len(xs)), xs)
        ax.set_xlim(-0.5, len(xs) - 0.5)  # one target: keep the winner's diamond beside its point
        ax.set_xlabel("bit-width")
        ax.set_ylabel("test top-1 (%)")
        ax.grid(alpha=0.3)
        if drawn or paper:  # below the axes: inside, it covered the winner's error bar and the FP line
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
        shown = (f"{SELECTED_SHOWN}: per method the COMPLETE trial with the best val_top1 in this campaign "
                 f"(dataset {store.campaign.dataset}), drawn at its test top-1"
                 + ("; diamonds: the confirmed winner's test mean ± sample std over fresh seeds" if confirmed else ""))
        if paper:
            ax.set_title(f"{arch}: ours ({store.campaign.dataset}) vs paper (ImageNet)")
            fig.caption = f"{shown}. Dashed: the paper's numbers, {PAPER_SOURCE}"
        else:
            ax.set_title(f"{arch}: ours only ({store.campaign.dataset})")
            fig.caption = shown
            fig.note = (f"the paper reports no numbers for {arch} (only mobilenet_v2, mobilenet_v3_small and "
                        f"efficientnet_lite0): ours only")
        fig.file = _save(mfig, out_dir, f"accuracy-vs-bits-{slug(arch)}.png")
        figs.append(fig)
    return figs


def fp_baseline(store: CampaignStore, arch: str, split: str = "val") -> float | None:
    """The ``{split}_top1`` of the FP checkpoint the campaign pretrained for ``arch`` (``fp/<arch>.json``,
    written beside it), or None (a given ``pretrained`` file, an older campaign, no such split)."""
    campaign_dir = getattr(store, "campaign_dir", None)
    if campaign_dir is None:
        return None
    path = Path(campaign_dir) / "fp" / f"{arch}.json"
    try:
        return float(json.loads(path.read_text())[f"{split}_top1"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def best_trial_curves(store: CampaignStore, target, best: TrialRecord | None, out_dir: Path) -> Figure:
    """Per-epoch accuracy, oscillating fraction (depthwise vs pointwise), frozen fraction, lambda and f_th."""
    fig = Figure("curves", f"Best trial per epoch ({target.label})")
    if best is None or best.run_id is None:
        fig.note = "no COMPLETE trial with an MLflow run"
        return fig
    fig.title += f": {best.trial_id} ({best.method})"
    h = {k: store.history(best.run_id, k) for k in ("val_top1", "val_top1_no_bnre", "osc_frac", "osc_frac_depthwise",
                                                     "osc_frac_pointwise", "frozen_frac", "dampen_lambda",
                                                     "freeze_threshold")}
    if not h["val_top1"]:
        fig.note = "the best trial's run has no per-epoch metrics (run `oscqat report sync` to backfill them)"
        return fig
    mfig, axes = plt.subplots(2, 2, figsize=(10, 7), layout="constrained")

    def line(ax, key, label, style="o-", **kw):
        if h[key]:
            xs, ys = zip(*h[key])
            ax.plot(xs, ys, style, label=label, **kw)

    ax = axes[0, 0]
    line(ax, "val_top1", "val top-1 (BN re-estimated)")
    line(ax, "val_top1_no_bnre", "val top-1 (running BN stats)", "s--")
    ax.set_title("accuracy")
    ax = axes[0, 1]
    line(ax, "osc_frac_depthwise", "depthwise")
    line(ax, "osc_frac_pointwise", "pointwise")
    line(ax, "osc_frac", "all tracked", ":", color="gray")
    ax.set_title("oscillating weight fraction")
    ax = axes[1, 0]
    line(ax, "frozen_frac", "frozen")
    ax.set_title("frozen weight fraction")
    ax = axes[1, 1]
    line(ax, "dampen_lambda", "dampening lambda", color="tab:blue")
    ax.set_ylabel("lambda")
    ax2 = ax.twinx()
    if h["freeze_threshold"]:
        xs, ys = zip(*h["freeze_threshold"])
        ax2.plot(xs, ys, "s--", color="tab:orange", label="freeze threshold f_th")
    ax2.set_ylabel("f_th")
    ax.set_title("schedules (at the epoch's last step)")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8)
    from matplotlib.ticker import MaxNLocator

    for a in axes.flat:
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.set_xlabel("epoch")
        a.grid(alpha=0.3)
        if a is not axes[1, 1] and a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8)
    mfig.suptitle(fig.title)
    fig.file = _save(mfig, out_dir, f"{slug(target.label)}-best-curves.png")
    fig.caption = f"trial {best.trial_id}, final val_top1 {best.val_top1:.4f}"
    return fig


def layer_heatmap(store: CampaignStore, target, best: TrialRecord | None, out_dir: Path) -> Figure:
    """The best trial's oscillating fraction per layer over epochs (its logged artifact, redrawn)."""
    from search.plots import layer_oscillation_plot

    fig = Figure("layers", f"Per-layer oscillations ({target.label})")
    if best is None or best.run_id is None:
        fig.note = "no COMPLETE trial with an MLflow run"
        return fig
    with tempfile.TemporaryDirectory() as tmp:
        path = store.download(best.run_id, "layer_oscillations.json", Path(tmp))
        history = json.loads(path.read_text()) if path else []
    if not history or not history[-1].get("layers"):
        fig.note = f"trial {best.trial_id} has no layer_oscillations.json (or it tracked no layers)"
        return fig
    name = f"{slug(target.label)}-layer-oscillations.png"
    out_dir.mkdir(parents=True, exist_ok=True)
    layer_oscillation_plot(history, out_dir / name, title=f"({target.label}, trial {best.trial_id})")
    fig.file = name
    fig.caption = f"trial {best.trial_id}: fraction of each layer's weights oscillating, per epoch"
    return fig


def campaign_figures(store: CampaignStore, out_dir: Path) -> dict:
    """Every figure of the report: ``{"overview": [...], "size": [...], "targets": {label: [...]}}``."""
    out_dir = Path(out_dir)
    # Optuna's plots switch matplotlib's global style to ggplot; keep ours (and theirs) contained.
    with plt.style.context("default"):
        result = {"overview": accuracy_vs_bits(store, out_dir), "size": [accuracy_vs_size(store, out_dir)],
                  "targets": {}}
    for target in store.targets:
        best = store.best(target)
        with plt.style.context("default"):
            figs = optuna_figures(store.study(target), target.label, out_dir)
        with plt.style.context("default"):
            figs.append(best_trial_curves(store, target, best, out_dir))
            figs.append(layer_heatmap(store, target, best, out_dir))
        result["targets"][target.label] = figs
    return result


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (size, accuracy) points no other point beats on both (smaller or equal size, higher
    or equal accuracy, one strictly), by increasing size."""
    front, best = [], float("-inf")
    for size, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if acc > best:
            front.append((size, acc))
            best = acc
    return front


def paper_model_size_kb(arch: str, bits: str | None, num_classes: int = 1000) -> float:
    """``model_size_kb`` of the paper's ImageNet network at ``bits`` (None: FP32), by ``oscqat.cost``."""
    from oscqat.config import parse_bits
    from oscqat.cost import model_size_bits
    from oscqat.models import create_model
    from oscqat.quantize import QuantConfig, quantize_model

    model = create_model(arch, num_classes=num_classes)
    if bits is not None:
        w, a = parse_bits(bits)
        quantize_model(model, QuantConfig(weight_bits=w, act_bits=a))
    return model_size_bits(model) / 8 / 1024


def accuracy_vs_size(store: CampaignStore, out_dir: Path) -> Figure:
    """Final val_top1 against packed model size over every target, the Pareto front of the targets'
    best trials drawn; the paper's ImageNet numbers (and FP) at their networks' sizes beside."""
    fig = Figure("accuracy_vs_size", "Accuracy vs model size (all targets)")
    mfig, ax = plt.subplots(figsize=(7.2, 4.6))
    best_points, archs = [], sorted({t.arch for t in store.targets})
    colors = {arch: f"C{i}" for i, arch in enumerate(archs)}
    for t in store.targets:
        # ranked on val_top1 (done[0] is the selected trial), every point drawn at its test top-1
        done = [r for r in store.ranked(t) if "model_size_kb" in r.final and "test_top1" in r.final]
        if not done:
            continue
        ax.scatter([r.final["model_size_kb"] for r in done], [_test_top1(r) for r in done], s=12, alpha=0.3,
                   color=colors[t.arch])
        size, acc = done[0].final["model_size_kb"], _test_top1(done[0])
        ax.scatter([size], [acc], s=60, color=colors[t.arch], edgecolor="black", zorder=3)
        ax.annotate(t.label, (size, acc), textcoords="offset points", xytext=(5, 5), fontsize=8)
        best_points.append((size, acc))
    if not best_points:
        plt.close(mfig)
        fig.note = ("no COMPLETE trial has model_size_kb and test_top1 metrics (campaigns run before they were "
                    "logged; `oscqat report sync` cannot backfill them)")
        return fig
    front = pareto_front(best_points)
    right = max(p[0] for p in best_points)  # the front holds its last accuracy out to the largest model
    if len(best_points) > 1:  # one target: a front of one point draws no line, so no legend entry either
        ax.step([p[0] for p in front] + [right], [p[1] for p in front] + [front[-1][1]], where="post",
                color="black", lw=1.2, label="Pareto front (selected trial per target)")
    paper_drawn = []
    for arch in archs:
        paper = paper_numbers(arch)
        if not paper:
            continue
        xs, ys = [], []
        for bits, methods in paper.items():
            xs.append(paper_model_size_kb(arch, bits))
            ys.append(max(methods.values()))
        ax.scatter(xs, ys, marker="s", facecolors="none", edgecolors=colors[arch], s=50,
                   label=f"paper: {arch} (ImageNet, best method)")
        if arch in PAPER_FP_TOP1:
            ax.scatter([paper_model_size_kb(arch, None)], [PAPER_FP_TOP1[arch]], marker="*", s=90,
                       color=colors[arch], label=f"paper: {arch} FP32")
        paper_drawn.append(arch)
    ax.set_xscale("log")
    ax.set_xlabel("model size (KiB, packed weights at trained bit-widths; log scale)")
    ax.set_ylabel("test top-1 (%)")
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")
    front_text = ("; the line is the Pareto front over the selected trials' test top-1" if len(best_points) > 1
                  else "")
    fig.caption = (f"{SELECTED_SHOWN}. Dots: COMPLETE trials at their test top-1 (dataset {store.campaign.dataset}); "
                   f"outlined: each target's selected trial (best val_top1){front_text}. Size = sum of weights x "
                   "weight bits + 32 bits per other parameter/BN statistic (oscqat.cost).")
    if paper_drawn:
        fig.caption += f" Squares/stars: the paper's ImageNet top-1 and FP32 at those networks' sizes, {PAPER_SOURCE}."
    else:
        fig.note = "the paper reports no numbers for these architectures: ours only"
    fig.file = _save(mfig, out_dir, "accuracy-vs-size.png")
    return fig
