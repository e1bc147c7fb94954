"""``report html``: one offline HTML page (inline CSS, no scripts, PNGs next to it) per campaign.

The folder is the report: ``index.html``, the PNGs it references by relative path and
``report.json`` (the same content as data: rows, figures, notes), so it can be zipped, opened
offline or logged as an MLflow artifact as is.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
from pathlib import Path

from reports.compare import compare_rows, params_text
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
"""


def _e(v) -> str:
    return html.escape("-" if v is None else str(v))


def _f(v, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _figure_html(fig: Figure) -> str:
    parts = [f'<section class="figure" id="fig-{_e(fig.file or fig.key)}"><h3>{_e(fig.title)}</h3>']
    if fig.note:
        parts.append(f'<p class="note">{_e(fig.note)}</p>')
    if fig.file:
        parts.append(f'<figure><img src="{_e(fig.file)}" alt="{_e(fig.title)}">'
                     f'<figcaption>{_e(fig.caption)}</figcaption></figure>')
    parts.append("</section>")
    return "".join(parts)


_NUMERIC = {1, 7, 9, 10, 11, 12, 13, 14}  # summary columns aligned right


def _summary_table(rows: list[dict]) -> str:
    head = ["target", "best val_top1", "trial", "method", "key params", "best LSQ", "best dampen/freeze", "gain",
            "osc frac (dw / pw)", "frozen", "complete", "pruned", "failed", "trial-epochs", "wall (s)"]
    out = ["<table id='summary'><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for r in rows:
        remedy = "-" if r["best_remedy_val_top1"] is None else (
            f"{r['best_remedy_val_top1']:.4f} ({r['best_remedy_method']}, {r['best_remedy_trial_id']})")
        lsq = "-" if r["best_lsq_val_top1"] is None else f"{r['best_lsq_val_top1']:.4f} ({r['best_lsq_trial_id']})"
        osc = "-" if r["osc_frac"] is None else (
            f"{r['osc_frac']:.4f} ({_f(r['osc_frac_depthwise'])} / {_f(r['osc_frac_pointwise'])})")
        cells = [_e(r["target"]), _f(r["best_val_top1"]), _e(r["best_trial_id"]), _e(r["method"]),
                 _e(params_text(r["params"])), _e(lsq), _e(remedy),
                 "-" if r["remedy_gain"] is None else f"{r['remedy_gain']:+.4f}", _e(osc), _f(r["frozen_frac"]),
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
                         "ours_top1_pct": round(best.val_top1 * 100, 2) if best else None,
                         "ours_trial_id": best.trial_id if best else None,
                         "paper_top1_pct": paper.get(method),
                         "paper_note": PAPER_NOTES.get((t.arch, t.bits, method))})
    head = "<tr><th>arch</th><th>bits</th><th>method</th><th>ours top-1 (%)</th><th>trial</th><th>paper top-1 (%)</th></tr>"
    body = "".join(
        f"<tr><td>{_e(r['arch'])}</td><td>{_e(r['bits'])}</td><td>{_e(r['method'])}</td>"
        f"<td class='num'>{_e(r['ours_top1_pct'])}</td><td>{_e(r['ours_trial_id'])}</td>"
        f"<td class='num'>{_e(r['paper_top1_pct'] if r['paper_top1_pct'] is not None else 'n/a')}"
        f"{' (' + _e(r['paper_note']) + ')' if r['paper_note'] else ''}</td></tr>" for r in rows)
    return f"<table id='paper'>{head}{body}</table>", rows


def build_report(store: CampaignStore, out_dir: Path) -> dict:
    """Write ``index.html``, its PNGs and ``report.json`` into ``out_dir``; returns the manifest."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    camp = store.campaign
    rows = compare_rows(store)
    figs = campaign_figures(store, out_dir)
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
             "<p>Best COMPLETE trial per target by final val_top1 (after BN re-estimation); oscillating and "
             "frozen fractions are the best trial's last epoch; compute is trial-epochs run and the sum of their "
             "<code>epoch_time_s</code>.</p>", f"<div class='scroll'>{_summary_table(rows)}</div>",
             "<h2 id='accuracy-vs-bits'>Accuracy vs bit-width</h2>"]
    parts += [_figure_html(f) for f in figs["overview"]]
    fp = ", ".join(f"{arch} {top1}" for arch, top1 in PAPER_FP_TOP1.items())
    parts += [f"<p class='meta'>Paper: {_e(PAPER_SOURCE)}; FP baselines {_e(fp)}. Paper cells are n/a for "
              f"architectures it did not evaluate{' (' + _e(', '.join(no_paper)) + ')' if no_paper else ''}.</p>",
              paper_html, "<h2 id='accuracy-vs-size'>Accuracy vs model size</h2>"]
    parts += [_figure_html(f) for f in figs["size"]]
    for t in store.targets:
        parts.append(f"<h2 id='target-{_e(t.slug)}'>{_e(t.label)}</h2>")
        best = store.best(t)
        if best is not None:
            parts.append(f"<p>Best trial <code>{_e(best.trial_id)}</code> ({_e(best.method)}"
                         f"{', starting point ' + _e(best.starting_point) if best.starting_point else ''}): "
                         f"val_top1 {best.val_top1:.4f}. Export it with <code>oscqat report export {_e(camp.name)} "
                         f"--target {_e(t.label)} --out best.yaml</code>.</p>")
        parts += [_figure_html(f) for f in figs["targets"][t.label]]
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
    """Log the report (its own files only, not whatever else is in ``out_dir``) as artifact
    ``report/`` on every target's parent run."""
    files = ["index.html", "report.json", *figure_files(manifest)]
    logged = []
    for t in store.targets:
        parent = store.parent_run_id(t)
        if parent is not None:
            for name in files:
                store.client.log_artifact(parent, str(Path(out_dir) / name), artifact_path="report")
            logged.append(parent)
    return logged
