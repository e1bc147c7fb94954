"""``report trials``: every trial of a target, one row each, sortable (table, CSV or JSON).

Rows are plain dicts built from ``CampaignStore.trials`` (MLflow and Optuna joined per trial), so
each output format shows the same data.
"""

from __future__ import annotations


from reports.compare import to_csv, to_json  # noqa: F401 - one CSV/JSON writer for every table
from reports.store import CampaignStore

SORT_KEYS = ("number", "val_top1", "test_top1", "epochs", "state", "method")
FORMATS = ("table", "csv", "json")
_STATE_ORDER = {"COMPLETE": 0, "RUNNING": 1, "PRUNED": 2, "FAIL": 3}


def trial_rows(store: CampaignStore, target) -> list[dict]:
    from reports.compare import key_params

    rows = []
    for rec in store.trials(target):
        epochs = rec.tags.get("oscqat.epochs")
        rows.append({
            "target": target.label, "number": rec.number, "trial_id": rec.trial_id, "state": rec.state,
            "epochs": int(epochs) if epochs and epochs.isdigit() else (rec.optuna_epochs or None),
            "method": rec.method, "val_top1": rec.val_top1, "test_top1": rec.final.get("test_top1"),
            "starting_point": rec.starting_point, "stage": rec.tags.get("oscqat.stage", "search"),
            "params": key_params(rec), "run_id": rec.run_id,
        })
    return rows


def sort_rows(rows: list[dict], key: str) -> list[dict]:
    """Best first for accuracies, most epochs first, COMPLETE first for state; missing values last."""
    if key == "state":
        return sorted(rows, key=lambda r: (_STATE_ORDER.get(r["state"], 9), -(r["val_top1"] or -1)))
    if key in ("val_top1", "test_top1", "epochs"):
        return sorted(rows, key=lambda r: (r[key] is None, -(r[key] or 0)))
    if key == "method":
        return sorted(rows, key=lambda r: (r["method"] or "~", -(r["val_top1"] or -1)))
    return sorted(rows, key=lambda r: (r["number"] is None, r["number"] or 0, r["trial_id"]))


def _num(v) -> str:
    return "-" if v is None else f"{v:.4f}"


_COLUMNS = (("#", True), ("trial", False), ("state", False), ("epochs", True), ("method", False),
            ("val_top1", True), ("test_top1", True))
_STYLE = {"COMPLETE": "green", "PRUNED": "yellow", "FAIL": "red", "RUNNING": "cyan"}


def _cells(r: dict) -> list[str]:
    return ["-" if r["number"] is None else str(r["number"]), r["trial_id"], r["state"].lower(),
            str(r["epochs"] or "-"), r["method"] or "-", _num(r["val_top1"]), _num(r["test_top1"])]


def _param_items(r: dict) -> list[str]:
    return [f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(r["params"].items())]


def rich_tables(rows: list[dict], title: str, width: int) -> list:
    """The trials table, with the key params as its last column when every ``k=v`` item fits the
    terminal; else a second table (trial, params) below, so no id, number or item is ever cut."""
    from rich.table import Table

    widths = [max([len(c)] + [len(_cells(r)[i]) for r in rows]) for i, (c, _) in enumerate(_COLUMNS)]
    main_width = sum(widths) + 3 * len(widths) + 1
    longest = max([len(item) for r in rows for item in _param_items(r)] + [6])
    inline = main_width + longest + 3 <= width

    def table(cols, title_text):
        t = Table(title=title_text, title_justify="left")
        for col, right in cols:
            t.add_column(col, justify="right" if right else "left", no_wrap=True)
        return t

    main = table(_COLUMNS + ((("params", False),) if inline else ()), title)
    for r in rows:
        cells = _cells(r)
        cells[2] = f"[{_STYLE.get(r['state'], '')}]{cells[2]}[/]"
        main.add_row(*cells, *(["\n".join(_param_items(r)) or "-"] if inline else []))
    if inline:
        return [main]
    params = table((("#", True), ("trial", False), ("params", False)), "key params")
    for r in rows:
        params.add_row(_cells(r)[0], r["trial_id"], ", ".join(_param_items(r)) or "-")
    params.columns[2].no_wrap = False
    params.columns[2].overflow = "fold"
    return [main, params]
