"""``report html``: one offline HTML page per campaign (inline CSS, figures as data URIs, no scripts).

``index.html`` is the whole report: it works mailed, opened offline or inside MLflow's artifact
viewer. ``report.json`` beside it holds the same content as data (rows, figures, notes).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import tempfile
from fractions import Fraction
from math import lcm
from pathlib import Path

from reports.compare import SPLIT_NOTE, compare_rows, key_params, params_text
from reports.figures import Figure, campaign_figures
from reports.paper import PAPER_FP_TOP1, PAPER_NOTES, PAPER_SOURCE, paper_numbers
from reports.store import CampaignStore
from search.uris import redact

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{margin-bottom:.2em} h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.9em;margin:1em 0} th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left}
th{background:#f3f3f3} td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:1.5em 0} figure img{max-width:100%;border:1px solid #eee} figcaption{color:#555;font-size:.9em}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.4em .8em;margin:.5em 0}
.meta{color:#555} code{background:#f5f5f5;padding:0 .2em} .scroll{overflow-x:auto}
.card{border:1px solid #cfd8dc;border-radius:6px;padding:.6em 1em;margin:1em 0;background:#f7fbff}
.card h3{margin:.2em 0 .4em} .card .big{font-size:1.5em;font-weight:600} .card pre{background:#eef2f5;padding:.4em .6em;overflow-x:auto}
.tag{display:inline-block;padding:0 .4em;border-radius:3px;font-size:.85em} .ok{background:#c8e6c9} .warn{background:#ffe0b2}
"""


def _e(v) -> str:
    return html.escape("-" if v is None else str(v))


def _f(v, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _figure_html(fig: Figure, fig_dir: Path) -> str:
    parts = [f'<section class="figure" id="fig-{_e(fig.file or fig.key)}"><h3>{_e(fig.title)}</h3>']
    if fig.note:
        parts.append(f'<p class="note">{_e(fig.note)}</p>')
    if fig.file:  # embedded: the page is one file that works anywhere
        parts.append(f'<figure><img src="{_data_uri(fig_dir / fig.file)}" alt="{_e(fig.title)}">'
                     f'<figcaption>{_e(fig.caption)}</figcaption></figure>')
    parts.append("</section>")
    return "".join(parts)


_SUMMARY_HEAD = ["target", "confirmed winner: test top-1", "selected trial", "method", "val_top1 (selected on)",
                 "test top-1", "key params", "best LSQ: test", "best dampen/freeze: test", "gain (test)",
                 "osc frac (dw / pw)", "frozen", "complete", "pruned", "failed", "trial-epochs", "wall (s)"]
_NUMERIC = {1, 4, 5, 9, 11, 12, 13, 14, 15, 16}  # summary columns aligned right


def _test_of(test, val, *labels) -> str:
    """``test (val v, labels)``: the held-out value shown, the selection value that chose it beside."""
    if val is None:
        return "-"
    return f"{_f(test)} (val {val:.4f}, {', '.join(str(x) for x in labels)})"


def _confirmed_text(r: dict) -> str:
    if not r.get("confirmed_trial_id") or r.get("confirmed_test_top1_mean") is None:
        return "-"
    std = r.get("confirmed_test_top1_std")
    return (f"{r['confirmed_test_top1_mean']:.4f}{' ± ' + format(std, '.4f') if std is not None else ''} "
            f"(n={len(r.get('confirm_seeds') or [])}, {r['confirmed_trial_id']})")


def _summary_table(rows: list[dict]) -> str:
    """Every accuracy shown is test top-1 of a trial chosen on val_top1 (never select and show on one split)."""
    out = ["<table id='summary'><tr>" + "".join(f"<th>{h}</th>" for h in _SUMMARY_HEAD) + "</tr>"]
    for r in rows:
        remedy = _test_of(r.get("best_remedy_test_top1"), r["best_remedy_val_top1"], r["best_remedy_method"],
                          r["best_remedy_trial_id"])
        lsq = _test_of(r.get("best_lsq_test_top1"), r["best_lsq_val_top1"], r["best_lsq_trial_id"])
        osc = "-" if r["osc_frac"] is None else (
            f"{r['osc_frac']:.4f} ({_f(r['osc_frac_depthwise'])} / {_f(r['osc_frac_pointwise'])})")
        gain = r.get("remedy_gain_test")
        cells = [_e(r["target"]), _e(_confirmed_text(r)), _e(r["best_trial_id"]), _e(r["method"]),
                 _f(r["best_val_top1"]), _f(r.get("best_test_top1")), _e(params_text(r["params"])), _e(lsq),
                 _e(remedy), "-" if gain is None else f"{gain:+.4f}", _e(osc), _f(r["frozen_frac"]),
                 str(r["trials_complete"]), str(r["trials_pruned"]), str(r["trials_failed"]),
                 str(r["trial_epochs"]), f"{r['wall_time_s']:.1f}"]
        out.append("<tr>" + "".join(f"<td class='num'>{c}</td>" if i in _NUMERIC else f"<td>{c}</td>"
                                    for i, c in enumerate(cells)) + "</tr>")
    out.append("</table>")
    return "".join(out)


def paper_table(store: CampaignStore) -> tuple[str, list[dict]]:
    """Ours vs the paper per architecture x bits x method (paper cells only where the arch matches)."""
    from reports.figures import METHOD_ORDER

    rows = []
    for t in store.targets:
        paper = (paper_numbers(t.arch) or {}).get(t.bits, {})
        for method in METHOD_ORDER:
            best = store.best(t, lambda r, m=method: r.method == m)
            if best is None and method not in paper:
                continue
            rows.append({"arch": t.arch, "bits": t.bits, "method": method,
                         # selected on val_top1, shown on the held-out test split
                         "ours_top1_pct": (round(best.final["test_top1"] * 100, 2)
                                           if best and "test_top1" in best.final else None),
                         "ours_val_top1_pct": round(best.val_top1 * 100, 2) if best else None,
                         "ours_trial_id": best.trial_id if best else None,
                         "paper_top1_pct": paper.get(method),
                         "paper_note": PAPER_NOTES.get((t.arch, t.bits, method))})
    head = "<tr><th>arch</th><th>bits</th><th>method</th><th>ours test top-1 (%)</th><th>selected on val (%)</th><th>trial</th><th>paper top-1 (%)</th></tr>"
    body = "".join(
        f"<tr><td>{_e(r['arch'])}</td><td>{_e(r['bits'])}</td><td>{_e(r['method'])}</td>"
        f"<td class='num'>{_e(r['ours_top1_pct'])}</td><td class='num'>{_e(r['ours_val_top1_pct'])}</td>"
        f"<td>{_e(r['ours_trial_id'])}</td>"
        f"<td class='num'>{_e(r['paper_top1_pct'] if r['paper_top1_pct'] is not None else 'n/a')}"
        f"{' (' + _e(r['paper_note']) + ')' if r['paper_note'] else ''}</td></tr>" for r in rows)
    return f"<table id='paper'>{head}{body}</table>", rows


def selection_size(values: list[float], logged: float | None = None) -> int | None:
    """Images in the selection split: logged by the trial, else the least common denominator of
    the trials' accuracies (each is correct/total), which is exact once a few trials differ."""
    if logged:
        return int(logged)
    dens = [Fraction(v).limit_denominator(200_000).denominator for v in values if v is not None and 0 < v < 1]
    if not dens:
        return None
    n = 1
    for d in dens:
        n = lcm(n, d)
    return n if n <= 200_000 else None


def winner_card(store: CampaignStore, target, row: dict) -> str:
    """The target's winner: confirmed (retrained with fresh seeds) when the campaign has a confirm
    stage, else the search's best, labelled unconfirmed; its numbers, ties, and how to reproduce it."""
    camp = store.campaign
    ranked = store.ranked(target)
    if not ranked:
        return "<div class='card'><h3>No winner yet</h3><p>No COMPLETE trial for this target.</p></div>"
    best = ranked[0]
    confirmed_id = row.get("confirmed_trial_id")
    winner = next((r for r in ranked if r.trial_id == confirmed_id), best) if confirmed_id else best
    n_sel = selection_size([r.val_top1 for r in store.trials(target)], winner.final.get("selection_size"))
    one_image = (f"; one image is {100 / n_sel:.2f} points of top-1" if n_sel else "")
    sel_text = (f"selection split: {n_sel} images{one_image}" if n_sel else "selection split size unknown")
    lines = []
    if confirmed_id:
        status = "<span class='tag ok'>confirmed</span>"
        seeds = row.get("confirm_seeds")
        test = row.get("confirmed_test_top1_mean")
        std = row.get("confirmed_test_top1_std")
        lines.append(f"<div class='big'>val {_f(row.get('confirmed_val_top1_mean'))} &middot; test "
                     f"{_f(test)}{' &plusmn; ' + _f(std) if std is not None else ''}</div>")
        lines.append(f"<p>mean over {_e(len(seeds) if isinstance(seeds, list) else seeds)} fresh seed(s) "
                     f"(test: sample std); its search value {winner.val_top1:.4f} (the search's best: "
                     f"{best.val_top1:.4f})</p>")
    else:
        status = ("<span class='tag warn'>unconfirmed</span> (the search's best on the selection split; "
                  "not retrained with fresh seeds)")
        test = winner.final.get("test_top1")
        lines.append(f"<div class='big'>val {winner.val_top1:.4f}"
                     f"{' &middot; test ' + _f(test) if test is not None else ''}</div>")
    lines.append(f"<p>trial <code>{_e(winner.trial_id)}</code> &middot; method <b>{_e(winner.method)}</b>"
                 f"{' &middot; starting point ' + _e(winner.starting_point) if winner.starting_point else ''}"
                 f" &middot; {_e(params_text(key_params(winner)))}</p>")
    lines.append(f"<p class='meta'>{_e(sel_text)}</p>")
    tol = (0.5 / n_sel) if n_sel else 1e-9
    ties = [r for r in ranked[1:] if abs(r.val_top1 - best.val_top1) <= tol]
    if ties:
        methods = sorted({r.method or "?" for r in [best, *ties]})
        lines.append(f"<p class='note'>Tie: {len(ties) + 1} trials share the best selection value "
                     f"{best.val_top1:.4f} ({', '.join(methods)}); the earliest in search order is shown. The search "
                     f"cannot tell them apart{': a confirm stage with fresh seeds can' if not confirmed_id else ''}."
                     f"</p>")
    final = row.get("final_test_top1") or row.get("final_val_top1")
    if final is not None:
        lines.append(f"<p>final training run: top-1 {_f(final)}</p>")
    slug = target.slug
    lines.append(f"<pre>oscqat report export {_e(camp.name)} --target {_e(target.label)} --out best-{_e(slug)}.yaml\n"
                 f"oscqat train best-{_e(slug)}.yaml</pre>")
    return f"<div class='card'><h3>Winner {status}</h3>{''.join(lines)}</div>"


def build_report(store: CampaignStore, out_dir: Path) -> dict:
    """Write ``index.html`` (figures embedded) and ``report.json`` into ``out_dir``; returns the manifest."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = compare_rows(store)
    with tempfile.TemporaryDirectory() as fig_tmp:
        return _build(store, out_dir, rows, Path(fig_tmp))


def _build(store: CampaignStore, out_dir: Path, rows: list[dict], fig_dir: Path) -> dict:
    camp = store.campaign
    figs = campaign_figures(store, fig_dir)
    paper_html, paper_rows = paper_table(store)
    no_paper = sorted({t.arch for t in store.targets if paper_numbers(t.arch) is None})
    when = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    sections = ["summary", "accuracy-vs-bits", "accuracy-vs-size"] + [f"target-{t.slug}" for t in store.targets]

    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>oscqat campaign {_e(camp.name)}"
             f"</title><style>{CSS}</style></head><body>",
             f"<h1>Campaign <code>{_e(camp.name)}</code></h1>",
             f"<p class='meta'>dataset {_e(camp.dataset)} &middot; {len(camp.targets)} target(s) &middot; "
             f"budget {camp.budget.num_samples} trials x up to {camp.budget.max_epochs} epochs (ASHA grace "
             f"{camp.budget.grace_period}) &middot; MLflow {_e(redact(store.tracking_uri))}, experiment "
             f"<code>{_e(camp.experiment_name)}</code> &middot; Optuna {_e(redact(store.optuna_storage))} &middot; "
             f"generated {_e(when)}</p>",
             "<nav><ul>" + "".join(f"<li><a href='#{s}'>{s}</a></li>" for s in sections) + "</ul></nav>",
             "<h2 id='summary'>Summary</h2>",
             f"<p class='meta' id='split-note'>{_e(SPLIT_NOTE)}.</p>",
             "<p>Per target the COMPLETE trial with the best final val_top1 (after BN re-estimation) is selected, "
             "and its held-out <b>test top-1</b> is shown (its val_top1 beside, as the value it was selected on); "
             "best LSQ and best dampen/freeze likewise, gain = their test difference. Oscillating and frozen "
             "fractions are the selected trial's last epoch; compute is trial-epochs run and the sum of their "
             "<code>epoch_time_s</code>.</p>", f"<div class='scroll'>{_summary_table(rows)}</div>",
             "<h2 id='accuracy-vs-bits'>Accuracy vs bit-width</h2>"]
    parts += [_figure_html(f, fig_dir) for f in figs["overview"]]
    fp = ", ".join(f"{arch} {top1}" for arch, top1 in PAPER_FP_TOP1.items())
    parts += [f"<p class='meta'>Paper: {_e(PAPER_SOURCE)}; FP baselines {_e(fp)}. Paper cells are n/a for "
              f"architectures it did not evaluate{' (' + _e(', '.join(no_paper)) + ')' if no_paper else ''}.</p>",
              paper_html, "<h2 id='accuracy-vs-size'>Accuracy vs model size</h2>"]
    parts += [_figure_html(f, fig_dir) for f in figs["size"]]
    for t in store.targets:
        parts.append(f"<h2 id='target-{_e(t.slug)}'>{_e(t.label)}</h2>")
        row = next((r for r in rows if r["target"] == t.label), {})
        parts.append(winner_card(store, t, row))
        parts += [_figure_html(f, fig_dir) for f in figs["targets"][t.label]]
    parts.append("</body></html>")
    (out_dir / "index.html").write_text("\n".join(parts), encoding="utf-8")
    manifest = {
        "campaign": camp.name, "generated": when, "sections": sections, "rows": rows, "paper": paper_rows,
        "figures": {"overview": [f.to_dict() for f in figs["overview"]], "size": [f.to_dict() for f in figs["size"]],
                    "targets": {k: [f.to_dict() for f in v] for k, v in figs["targets"].items()}},
    }
    (out_dir / "report.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def figure_files(manifest: dict) -> list[str]:
    figs = manifest["figures"]["overview"] + manifest["figures"].get("size", []) + [f for v in manifest["figures"]["targets"].values() for f in v]
    return [f["file"] for f in figs if f["file"]]


def log_report(store: CampaignStore, out_dir: Path, manifest: dict) -> list[str]:
    """Log the report (``index.html`` and ``report.json``) once, as artifact ``report/`` on the first
    target's parent run; the other parents get a tag naming that run. Returns the run logged on."""
    parents = [p for p in (store.parent_run_id(t) for t in store.targets) if p is not None]
    if not parents:
        return []
    for name in ("index.html", "report.json"):
        store.client.log_artifact(parents[0], str(Path(out_dir) / name), artifact_path="report")
    for parent in parents:
        store.client.set_tag(parent, "oscqat.report", f"runs:/{parents[0]}/report/index.html")
    return parents[:1]
