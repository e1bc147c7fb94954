"""``report compare``: one row per target, best trial vs plain LSQ, states and compute spent.

Rows are plain dicts so every output format (rich table, CSV, JSON, Markdown) shows the same data.
"""

from __future__ import annotations

import csv
import io
import json

from oscqat.stats import is_tie
from reports.store import CampaignStore, TrialRecord

# Sampled params that say nothing beyond the method (fixed values) are left out of "key params".
_FIXED_PARAMS = {"method", "dampen_aggregation"}
_FALLBACK_KEYS = ("lr", "weight_decay", "quantizer_lr", "dampen_lambda", "dampen_start", "freeze_threshold_start",
                  "freeze_threshold_end", "freeze_start", "osc_momentum")
FORMATS = ("table", "csv", "json", "markdown")
SPLIT_NOTE = ("selected on val_top1 (the selection split, carved from training data); test = the held-out test "
              "split, never selected on; confirmed winner = best mean val over fresh seeds, test mean ± sample std")


def key_params(rec: TrialRecord | None) -> dict:
    """The params the search chose for this trial (Optuna's view; MLflow's params as a fallback)."""
    if rec is None:
        return {}
    if rec.sampled:
        return {k: v for k, v in rec.sampled.items() if k not in _FIXED_PARAMS}
    keys = [k for k in _FALLBACK_KEYS if k in rec.params]
    if rec.method == "lsq":
        keys = keys[:3]
    out = {}
    for k in keys:
        try:
            out[k] = float(rec.params[k])
        except ValueError:
            out[k] = rec.params[k]
    return out


def compute_spent(store: CampaignStore, target) -> tuple[int, float]:
    """Trial-epochs run and their summed training+evaluation time (from ``epoch_time_s``)."""
    epochs, seconds = 0, 0.0
    for rec in store.trials(target):
        hist = store.history(rec.run_id, "epoch_time_s")
        if hist:
            epochs += len(hist)
            seconds += sum(v for _, v in hist)
        else:  # no MLflow metrics (lost writes; `report sync` restores them): count the epochs Optuna saw
            epochs += rec.optuna_epochs
    return epochs, seconds


def compare_rows(store: CampaignStore) -> list[dict]:
    rows = []
    for target in store.targets:
        best = store.best(target)
        lsq = store.best(target, lambda r: r.method == "lsq")
        remedy = store.best(target, lambda r: r.is_remedy)
        counts = store.counts(target)
        epochs, seconds = compute_spent(store, target)
        final = best.final if best else {}
        confirmed, ties, _ = store.confirmed(target)
        rows.append({
            "target": target.label,
            "arch": target.arch,
            "bits": target.bits,
            "best_val_top1": best.val_top1 if best else None,
            "best_trial_id": best.trial_id if best else None,
            "method": best.method if best else None,
            "params": key_params(best),
            "starting_point": best.starting_point if best else None,
            "val_top1_no_bnre": final.get("val_top1_no_bnre"),
            "best_lsq_val_top1": lsq.val_top1 if lsq else None,
            "best_lsq_trial_id": lsq.trial_id if lsq else None,
            "best_remedy_val_top1": remedy.val_top1 if remedy else None,
            "best_remedy_trial_id": remedy.trial_id if remedy else None,
            "best_remedy_method": remedy.method if remedy else None,
            "remedy_gain": (remedy.val_top1 - lsq.val_top1) if (lsq and remedy) else None,
            # the same val-selected trials on the held-out test split (what the HTML report shows)
            "best_lsq_test_top1": lsq.final.get("test_top1") if lsq else None,
            "best_remedy_test_top1": remedy.final.get("test_top1") if remedy else None,
            "remedy_gain_test": (remedy.final["test_top1"] - lsq.final["test_top1"])
                                if (lsq and remedy and "test_top1" in lsq.final and "test_top1" in remedy.final) else None,
            "osc_frac": final.get("osc_frac"),
            "osc_frac_depthwise": final.get("osc_frac_depthwise"),
            "osc_frac_pointwise": final.get("osc_frac_pointwise"),
            "frozen_frac": final.get("frozen_frac"),
            "trials_complete": counts.get("COMPLETE", 0),
            "trials_pruned": counts.get("PRUNED", 0),
            "trials_failed": counts.get("FAIL", 0),
            "trials_running": counts.get("RUNNING", 0),
            "trial_epochs": epochs,
            "wall_time_s": round(seconds, 3),
            # which split chose and which is shown: trials are ranked on val (the selection split);
            # test_top1 is the held-out split, measured at each trial's last epoch, never selected on
            "selected_on": "val_top1",
            "best_test_top1": final.get("test_top1"),
            "best_is_tied": bool(best and any(r.trial_id != best.trial_id and is_tie(r.val_top1, best.val_top1)
                                              for r in store.ranked(target))),
            "confirmed_trial_id": confirmed.trial_id if confirmed else None,
            "confirmed_method": (store.record(target, confirmed.trial_id).method
                                 if confirmed and store.record(target, confirmed.trial_id) else None),
            "confirmed_val_top1_mean": confirmed.val_mean if confirmed else None,
            "confirmed_val_top1_std": confirmed.val_std if confirmed else None,
            "confirmed_test_top1_mean": confirmed.test_mean if confirmed else None,
            "confirmed_test_top1_std": confirmed.test_std if confirmed else None,
            "confirm_seeds": confirmed.seeds if confirmed else [],
            "confirm_ties": ties,
        })
    return rows


# formatting -------------------------------------------------------------------------------
def _num(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def params_text(params: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(params.items())) or "-"


def _display(row: dict, sep: str = ", ") -> dict[str, str]:
    """The human-oriented columns shared by the table (``sep="\\n"``: narrow cells) and Markdown outputs."""
    remedy = "-"
    if row["best_remedy_val_top1"] is not None:
        remedy = f"{row['best_remedy_val_top1']:.4f}{sep}{row['best_remedy_method']}{sep}{row['best_remedy_trial_id']}"
    lsq = "-" if row["best_lsq_val_top1"] is None else f"{row['best_lsq_val_top1']:.4f}{sep}{row['best_lsq_trial_id']}"
    osc = "-" if row["osc_frac"] is None else (
        f"{row['osc_frac']:.4f}{sep}dw {_num(row['osc_frac_depthwise'])}{sep}pw {_num(row['osc_frac_pointwise'])}")
    params = sep.join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(row["params"].items()))
    confirmed = "-"
    if row.get("confirmed_trial_id"):
        test = row["confirmed_test_top1_mean"]
        std = row["confirmed_test_top1_std"]
        test_text = "-" if test is None else (f"{test:.4f}" + (f" ± {std:.4f}" if std is not None else ""))
        confirmed = (f"{row['confirmed_trial_id']}{sep}val {_num(row['confirmed_val_top1_mean'])}{sep}"
                     f"test {test_text}{sep}n={len(row['confirm_seeds'])}"
                     + (f"{sep}tie: {', '.join(row['confirm_ties'])}" if row.get("confirm_ties") else ""))
    return {
        "target": row["target"],
        "confirmed winner": confirmed,
        "best top1": _num(row["best_val_top1"]) + (" (tie)" if row.get("best_is_tied") else ""),
        "trial": row["best_trial_id"] or "-",
        "method": row["method"] or "-",
        "key params": params or "-",
        "best LSQ": lsq,
        "best dampen/freeze": remedy,
        "osc frac": osc,
        "frozen": _num(row["frozen_frac"]),
        "complete/pruned/failed": f"{row['trials_complete']}/{row['trials_pruned']}/{row['trials_failed']}"
                                  + (f" (+{row['trials_running']} running)" if row["trials_running"] else ""),
        "trial-epochs": str(row["trial_epochs"]),
        "wall (s)": f"{row['wall_time_s']:.1f}",
    }


def rich_table(rows: list[dict], title: str):
    from rich.table import Table

    table = Table(title=title, caption=SPLIT_NOTE)
    short = {"complete/pruned/failed": "C/P/F", "trial-epochs": "trial\nepochs", "best dampen/freeze":
             "best dampen/\nfreeze", "key params": "key params"}
    widths = {"confirmed winner": 16, "best": 8, "key params": 18, "best LSQ": 8, "best dampen/freeze": 13, "osc frac": 9}
    cols = ["target", "confirmed winner", "best", "key params", "best LSQ", "best dampen/freeze", "osc frac", "frozen",
            "complete/pruned/failed", "trial-epochs", "wall (s)"]
    for col in cols:
        table.add_column(short.get(col, col), overflow="fold", min_width=widths.get(col))
    for row in rows:
        shown = _display(row, sep="\n")
        shown["best"] = f"{shown['best top1']}\n{shown['trial']}\n{shown['method']}"
        table.add_row(*(shown[c] for c in cols))
    return table


def rich_cards(rows: list[dict], title: str) -> list:
    """One two-column table per target, for terminals too narrow for the wide table."""
    from rich.table import Table

    from rich.text import Text

    cards = []
    for row in rows:
        table = Table(title=f"{title}: {row['target']}", show_header=False)
        table.add_column("", style="bold")
        table.add_column("", overflow="fold")
        for key, value in _display(row).items():
            if key != "target":
                table.add_row(key, value)
        cards.append(table)
    return cards + [Text(SPLIT_NOTE)]


def to_markdown(rows: list[dict]) -> str:
    if not rows:
        return ""
    shown = [_display(r) for r in rows]
    cols = list(shown[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(s[c].replace("|", "\\|") for c in cols) + " |" for s in shown]
    return "\n".join(lines) + "\n\n" + SPLIT_NOTE + "\n"


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else ("" if v is None else v)
                             for k, v in row.items()})
    return buf.getvalue()


def to_json(rows: list[dict]) -> str:
    """Rows as JSON (``report compare`` and ``report trials`` share these writers)."""
    return json.dumps(rows, indent=2, sort_keys=False) + "\n"
