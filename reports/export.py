"""``report export``: a trial's complete TrainConfig as YAML, ready for ``oscqat train``.

The file is exactly a TrainConfig; leading ``# oscqat-...`` comment lines name the source
(campaign, target, trial, tracking URI, experiment) so ``oscqat train`` can log the final
training as a run linked to the campaign. Comments never change what the YAML loads as.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from oscqat.config import ConfigError, TrainConfig, format_validation_error
from reports.header import HEADER_PREFIX, SOURCE_KEY
from reports.store import CampaignStore, ReportError, TrialRecord, absolute_uri
from search.uris import redact
from search.tracking import TAG



@dataclass
class ExportResult:
    path: Path
    trial: TrialRecord
    config: TrainConfig
    parent_run_id: str | None
    logged: bool
    chosen_as: str = ""


def trial_config(store: CampaignStore, rec: TrialRecord) -> TrainConfig:
    """The trial's full config: its ``train_config.yaml`` artifact, else its MLflow params."""
    from pydantic import ValidationError

    data = None
    if rec.run_id is not None:
        with tempfile.TemporaryDirectory() as tmp:
            path = store.download(rec.run_id, "train_config.yaml", Path(tmp))
            if path is not None:
                data = yaml.safe_load(path.read_text())
    if data is None:
        if not rec.params:
            raise ReportError(f"trial {rec.trial_id} has no MLflow run with params or train_config.yaml; "
                              f"run `oscqat report sync {store.campaign.name}` first")
        # trials log what the search chose; the fixed rest of the config is on their parent run
        parent = rec.tags.get("mlflow.parentRunId")
        params = {**(store.client.get_run(parent).data.params if parent else {}), **rec.params}
        data = {k: (None if v == "None" else v) for k, v in params.items() if k in TrainConfig.model_fields}
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        msg = format_validation_error(exc, f"config of trial {rec.trial_id}")
        if "pretrained" in msg:
            msg += "\n  (the campaign's FP checkpoint has moved or was deleted; restore it or edit `pretrained`)"
        raise ReportError(msg) from None


def header_lines(store: CampaignStore, target, rec: TrialRecord, rank: int, parent_id: str | None,
                 trial_epochs: int) -> list[str]:
    threads = max(1, int(store.campaign.resources.cpu))
    return [
        f"{HEADER_PREFIX}{SOURCE_KEY}: campaign={store.campaign.name} target={target.label} trial={rec.trial_id} rank={rank}",
        f"{HEADER_PREFIX}tracking-uri: {redact(absolute_uri(store.tracking_uri))}",
        f"{HEADER_PREFIX}experiment: {store.campaign.experiment_name}",
        f"{HEADER_PREFIX}parent-run: {parent_id or ''}",
        f"{HEADER_PREFIX}trial-run: {rec.run_id or ''}",
        f"# trial {rec.trial_id}: final val_top1 {rec.val_top1:.6f} after {trial_epochs} epochs, method {rec.method}",
        f"# it trained with {threads} torch thread(s) (its Ray CPU share); on CPU, OMP_NUM_THREADS={threads} and "
        f"epochs {trial_epochs} reproduce it bit for bit",
        "# `oscqat train THIS.yaml` logs the final training to the campaign's MLflow experiment (--no-track: don't)",
    ]


def choose_trial(store: CampaignStore, target, rank: int | None) -> tuple[TrialRecord, str]:
    """The trial to export and how it was chosen: the confirmed winner by default (when the
    campaign confirmed), else / with ``rank`` the rank-th best COMPLETE search trial on val_top1."""
    ranked = store.ranked(target)
    if not ranked:
        raise ReportError(f"target {target.label} has no COMPLETE trial to export "
                          f"(states: {store.counts(target)})")
    if rank is None:
        winner, ties, _ = store.confirmed(target)
        rec = store.record(target, winner.trial_id) if winner else None
        if rec is not None:
            how = (f"confirmed winner: best mean val_top1 {winner.val_mean:.6f} over seeds {winner.seeds}"
                   + (f" (tied with {', '.join(ties)})" if ties else ""))
            if winner.test_mean is not None:
                std = f" ± {winner.test_std:.6f} (sample std)" if winner.test_std is not None else ""
                how += f"; test_top1 {winner.test_mean:.6f}{std}"
            return rec, how
        rank = 1
    if not 1 <= rank <= len(ranked):
        raise ReportError(f"--rank {rank} is out of range: target {target.label} has {len(ranked)} COMPLETE "
                          f"trial(s)", code=2)
    return ranked[rank - 1], f"search rank {rank} by final val_top1 (not confirmed with other seeds)"


def export_trial(store: CampaignStore, target_label: str, out: Path, rank: int | None = None,
                 epochs: int | None = None, log: bool = True, overwrite: bool = False) -> ExportResult:
    """Write the chosen trial's config to ``out`` (see ``choose_trial``); log it on the parent run.
    An existing ``out`` is refused (exit 2) unless ``overwrite``: it may be someone's edited config."""
    out = Path(out)
    if out.exists() and (not overwrite or not out.is_file()):
        raise ReportError(f"--out {out} already exists" + ("" if out.is_file() else " and is not a file")
                          + "; pick another path or pass --force to overwrite it", code=2)
    target = store.target(target_label)
    rec, how = choose_trial(store, target, rank)
    rank = next(i + 1 for i, r in enumerate(store.ranked(target)) if r.trial_id == rec.trial_id)
    cfg = trial_config(store, rec)
    trial_epochs = cfg.epochs
    if epochs is not None:
        cfg.epochs = epochs
    parent_id = store.parent_run_id(target)
    text = "\n".join(header_lines(store, target, rec, rank, parent_id, trial_epochs) + [f"# chosen as: {how}"]) \
        + "\n" + cfg.to_yaml()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    try:  # the file must load back as exactly this TrainConfig
        again = TrainConfig.from_yaml(out)
    except ConfigError as exc:  # pragma: no cover - would be a bug in TrainConfig.to_yaml
        raise ReportError(f"the exported file does not load back: {exc}") from None
    if again != cfg:  # pragma: no cover - would be a bug in TrainConfig.to_yaml
        raise ReportError(f"{out}: the exported YAML does not load back as the trial's config")
    logged = False
    if log and parent_id is not None:
        store.client.log_artifact(parent_id, str(out), artifact_path=f"exports/{rec.trial_id}")
        store.client.set_tag(parent_id, f"{TAG}exported_trial_id", rec.trial_id)
        if rec.run_id is not None:
            store.client.set_tag(rec.run_id, f"{TAG}exported", "true")
        logged = True
    return ExportResult(out, rec, cfg, parent_id, logged, how)
