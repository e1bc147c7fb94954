"""``oscqat report html`` / ``plot``: every section and figure exists, works offline, is logged."""

from __future__ import annotations

import json
import re
from pathlib import Path

from html import escape as html_text, unescape as html_unescape

from reports_testlib import invoke

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TARGET_FIGURES = ("history", "importances", "parallel", "slice", "curves", "layers")


def _all_figures(manifest: dict) -> list[dict]:
    return manifest["figures"]["overview"] + manifest["figures"]["size"] + [f for v in manifest["figures"]["targets"].values() for f in v]


def test_html_report_sections_figures_and_artifacts(report_campaign, tmp_path):
    rc = report_campaign
    out = tmp_path / "report"
    res = invoke("report", "html", rc.campaign_dir, "--out", out)
    assert res.exit_code == 0, res.output
    page = (out / "index.html").read_text()
    manifest = json.loads((out / "report.json").read_text())
    # sections: summary, accuracy vs bit-width, one per target
    for section in ("summary", "accuracy-vs-bits", "target-demo_net-w3a3", "target-demo_net-w4a4"):
        assert f"id='{section}'" in page and section in manifest["sections"]
    assert "id='paper'" in page and "id='summary'" in page
    # every target has all six figures, each either drawn or explained by a note
    for label in ("demo_net/w3a3", "demo_net/w4a4"):
        figs = manifest["figures"]["targets"][label]
        assert [f["key"] for f in figs] == list(TARGET_FIGURES)
        drawn = {f["key"] for f in figs if f["file"]}
        assert {"history", "curves", "layers"} <= drawn, figs
        for f in figs:
            assert f["file"] or f["note"], f
        importances = figs[1]
        # 1-3 COMPLETE trials per target here: too few for importances, said so in the report
        assert importances["file"] is None and "too few trials" in importances["note"]
        assert importances["note"] in page.replace("&#x27;", "'")
    # accuracy vs bit-width: demo_net has no paper numbers, and the report says so
    overview = manifest["figures"]["overview"]
    assert [f["file"] for f in overview] == ["accuracy-vs-bits-demo_net.png"]
    assert "ours only" in overview[0]["note"] and "paper reports no numbers for demo_net" in page and "n/a" in page
    # accuracy vs model size over both targets (trials log model_size_kb), the Pareto front drawn
    assert "id='accuracy-vs-size'" in page and "accuracy-vs-size" in manifest["sections"]
    size = manifest["figures"]["size"]
    assert [f["file"] for f in size] == ["accuracy-vs-size.png"] and "Pareto front" in size[0]["caption"]
    # select on one split, show another: the summary shows the selected trial's held-out test top-1
    # (val beside), the confirmed winner's test mean ± sample std, and says which split did what
    from reports.compare import SPLIT_NOTE

    assert html_text(SPLIT_NOTE) in page and "val_top1 (selected on)" in page
    summary = page.split("id='summary'>", 1)[1].split("</table>", 1)[0]
    for row in manifest["rows"]:
        assert row["best_test_top1"] is not None and f"{row['best_test_top1']:.4f}" in summary
        assert f"{row['confirmed_test_top1_mean']:.4f} ± {row['confirmed_test_top1_std']:.4f}" in html_unescape(summary)
    assert overview[0]["caption"].startswith("selected on val_top1, shown: held-out test top-1")
    assert "confirmed winner's test mean" in overview[0]["caption"]
    assert size[0]["caption"].startswith("selected on val_top1, shown: held-out test top-1")
    # one file: every figure is embedded as a PNG data URI, no image files beside the page
    import base64

    files = [f["file"] for f in _all_figures(manifest) if f["file"]]
    assert len(files) >= 1 + 2 * 3
    embedded = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(embedded) == len(files)
    for data in embedded:
        png = base64.b64decode(data)
        assert png[:8] == PNG_MAGIC and len(png) > 5000
    assert not list(out.glob("*.png")) and sorted(p.name for p in out.iterdir()) == ["index.html", "report.json"]
    # a winner card per target, confirmed (the fixture campaign confirms its top 2 with 2 seeds), with
    # its test mean ± sample std and the commands to reproduce it
    assert page.count("<div class='card'><h3>Winner") == 2 and page.count("<span class='tag ok'>confirmed</span>") == 2
    assert "unconfirmed" not in page and "&plusmn;" in page
    assert "oscqat report export " in page and "oscqat train best-demo_net-w3a3.yaml" in page
    assert "docs/PAPER.md" in page and "METHOD.md section 7" not in page
    # offline: nothing is loaded from elsewhere (no scripts, no remote URLs in src/href)
    assert "<script" not in page
    assert not re.findall(r'(?:src|href)=["\']?(?:https?:)?//', page)
    # logged once, as artifact report/ on the first target's parent; every parent points to it
    client = rc.client()
    exp = client.get_experiment_by_name(rc.experiment).experiment_id
    parents = client.search_runs([exp], filter_string="tags.`oscqat.role` = 'parent'")
    assert len(parents) == 2
    logged = {p.info.run_id: {Path(a.path).name for a in client.list_artifacts(p.info.run_id, "report")}
              for p in parents}
    assert sorted(map(sorted, logged.values())) == [[], ["index.html", "report.json"]]
    holder = next(rid for rid, names in logged.items() if names)
    for parent in parents:
        assert parent.data.tags.get("oscqat.report") == f"runs:/{holder}/report/index.html"


def test_plot_writes_only_pngs(report_campaign, tmp_path):
    out = tmp_path / "plots"
    res = invoke("report", "plot", report_campaign.campaign_dir, "--out", out)
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in out.iterdir())
    assert names and all(n.endswith(".png") for n in names)
    assert "accuracy-vs-bits-demo_net.png" in names and "demo_net-w3a3-best-curves.png" in names


def test_accuracy_figure_puts_paper_numbers_beside_ours(tmp_path):
    """For an architecture the paper evaluated, its numbers are drawn next to ours (no campaign needed)."""
    from types import SimpleNamespace

    from reports.figures import accuracy_vs_bits
    from reports.store import TrialRecord

    targets = [SimpleNamespace(arch="mobilenet_v2", bits=b, label=f"mobilenet_v2/{b}") for b in ("w4a4", "w3a3")]
    best = {("w3a3", "lsq"): 0.60, ("w3a3", "dampen"): 0.64, ("w4a4", "lsq"): 0.66, ("w4a4", "dampen"): 0.69}

    class FakeStore:
        campaign = SimpleNamespace(dataset="imagefolder")

        def __init__(self):
            self.targets = targets

        def best(self, target, method_filter=None):
            for method in ("lsq", "dampen", "freeze"):
                val = best.get((target.bits, method))
                rec = TrialRecord(trial_id="t", state="COMPLETE", method=method, val_top1=val,
                                  final={} if val is None else {"test_top1": val - 0.01})
                if rec.val_top1 is not None and (method_filter is None or method_filter(rec)):
                    return rec
            return None

        def confirmed(self, target):
            return None, [], []

    figs = accuracy_vs_bits(FakeStore(), tmp_path)
    assert len(figs) == 1 and figs[0].note is None and "paper" in figs[0].caption.lower()
    assert figs[0].caption.startswith("selected on val_top1, shown: held-out test top-1")
    assert (tmp_path / figs[0].file).read_bytes()[:8] == PNG_MAGIC


def test_pareto_front_keeps_only_undominated_points():
    from reports.figures import pareto_front

    points = [(30.0, 0.9), (25.0, 0.8), (25.0, 0.85), (40.0, 0.88), (50.0, 0.95), (10.0, 0.5)]
    assert pareto_front(points) == [(10.0, 0.5), (25.0, 0.85), (30.0, 0.9), (50.0, 0.95)]
