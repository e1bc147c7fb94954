"""Final training of an exported config, logged to MLflow as a run linked to its campaign.

``oscqat train best.yaml`` lands here (via the root CLI) when the YAML carries the
``# oscqat-source:`` header that ``report export`` writes. The library (``oscqat``) stays free
of MLflow: it only calls the ``on_epoch`` hook this module provides. Tracking never stops
training: if the server is unreachable the run trains untracked, with a warning.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from reports.header import SOURCE_KEY, parse_source, read_header
from search.uris import redact

log = logging.getLogger(__name__)
RUN_FILE = "mlflow_run.json"  # in --out: lets a resumed final training continue the same run


class FinalRunLogger:
    """Writes one MLflow run (role=final) for a final training; every write is best-effort."""

    def __init__(self, header: dict[str, str], out: Path | None = None):
        self.header = header
        self.source = parse_source(header.get(SOURCE_KEY, ""))
        uri = header.get("tracking-uri", "")
        if "***" in uri:  # credentials were redacted from the file: take them from the environment
            uri = os.environ.get("MLFLOW_TRACKING_URI", uri)
        self.tracking_uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
        self.experiment = header.get("experiment") or self.source.get("campaign", "oscqat-final")
        self.out = out
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._client = None
        self._pending: list = []

    @property
    def client(self):
        if self._client is None:
            from search.tracking import client_for

            self._client = client_for(self.tracking_uri)
        return self._client

    def _try(self, what: str, fn) -> bool:
        try:
            fn()
            return True
        except Exception as exc:  # noqa: BLE001 - tracking must never stop training
            log.warning("MLflow: could not %s (%s: %s)", what, exc.__class__.__name__, redact(str(exc)).splitlines()[0][:200])
            return False

    def start(self, cfg) -> str | None:
        """Create (or, when resuming in the same --out, reopen) the run; None if MLflow is unreachable."""
        from mlflow.entities import Param

        from search.tracking import TAG, get_or_create_experiment, safe_value

        def create():
            self.experiment_id = get_or_create_experiment(self.client, self.experiment)
            previous = self._previous_run_id()
            if previous:
                self.run_id = previous
                self.client.update_run(previous, status="RUNNING")
                return
            tags = {f"{TAG}role": "final", f"{TAG}campaign": self.source.get("campaign", ""),
                    f"{TAG}target": self.source.get("target", ""),
                    f"{TAG}source_trial_id": self.source.get("trial", ""),
                    f"{TAG}source_rank": self.source.get("rank", ""),
                    f"{TAG}source_run_id": self.header.get("trial-run", ""),
                    f"{TAG}parent_run_id": self.header.get("parent-run", ""),
                    f"{TAG}arch": cfg.arch, f"{TAG}bits": cfg.bits}
            name = f"final/{self.source.get('target', cfg.arch + '/' + cfg.bits)}/{self.source.get('trial', '')}"
            run = self.client.create_run(self.experiment_id, run_name=name,
                                         tags={k: safe_value(k, v) for k, v in tags.items() if v})
            self.run_id = run.info.run_id
            params = [Param(k, safe_value(k, v)) for k, v in sorted(cfg.model_dump(mode="json").items())]
            for i in range(0, len(params), 90):
                self.client.log_batch(self.run_id, params=params[i:i + 90])
            if self.out is not None:
                self.out.mkdir(parents=True, exist_ok=True)
                (self.out / RUN_FILE).write_text(json.dumps({"run_id": self.run_id, "tracking_uri": self.tracking_uri}))

        if not self._try(f"create the final-training run in {self.experiment!r}", create):
            self.run_id = None
        return self.run_id

    def _previous_run_id(self) -> str | None:
        if self.out is None or not (self.out / RUN_FILE).is_file() or not (self.out / "checkpoint.pt").is_file():
            return None
        try:
            data = json.loads((self.out / RUN_FILE).read_text())
            run = self.client.get_run(data["run_id"])
        except Exception:  # noqa: BLE001 - a stale or foreign file: start a new run
            return None
        return run.info.run_id if run.info.experiment_id == self.experiment_id else None

    def on_epoch(self, metrics: dict, trainer=None) -> None:
        """Per-epoch metrics with step = epoch (the ``run_training`` hook)."""
        if self.run_id is None:
            return
        from mlflow.entities import Metric

        from search.tracking import SCALAR_METRICS

        step, ts = int(metrics["epoch"]), int(time.time() * 1000)
        batch = [Metric(k, float(metrics[k]), ts, step) for k in SCALAR_METRICS
                 if isinstance(metrics.get(k), (int, float)) and math.isfinite(float(metrics[k]))]
        self._pending.append(batch)
        while self._pending and self._try(f"log epoch {step}", lambda: self.client.log_batch(self.run_id,
                                                                                              metrics=self._pending[0])):
            self._pending.pop(0)

    def finish(self, status: str, cfg=None, trainer=None) -> None:
        if self.run_id is None:
            return
        while self._pending and self._try("log buffered metrics",
                                          lambda: self.client.log_batch(self.run_id, metrics=self._pending[0])):
            self._pending.pop(0)
        if trainer is not None and cfg is not None:
            self._try("log artifacts", lambda: self._log_artifacts(cfg, trainer))
        self._try(f"mark the run {status}", lambda: self.client.set_terminated(self.run_id, status))

    def _log_artifacts(self, cfg, trainer) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            (tmp / "train_config.yaml").write_text(cfg.to_yaml())
            (tmp / "metrics.json").write_text(json.dumps({"epochs": trainer.history}, indent=2))
            layer_hist = [{"epoch": i + 1, "layers": {k: v["osc_frac"] for k, v in layers.items()}}
                          for i, layers in enumerate(trainer.layer_history)]
            (tmp / "layer_oscillations.json").write_text(json.dumps(layer_hist))
            if layer_hist and layer_hist[-1]["layers"]:
                from search.plots import layer_oscillation_plot

                layer_oscillation_plot(layer_hist, tmp / "layer_oscillations.png", title="final")
            self.client.log_artifacts(self.run_id, str(tmp))


def train_from_export(config: Path, epochs: int | None, as_json: bool, out: Path | None, quiet: bool) -> None:
    """``oscqat train`` for an exported config: same behaviour and output, plus the MLflow run."""
    from rich.console import Console

    from oscqat.cli import err_console, fail, load_train_config, results_table, run_training
    from oscqat.config import ConfigError

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        cfg = load_train_config(config, epochs)
    except ConfigError as exc:
        raise fail(str(exc))
    logger = FinalRunLogger(read_header(config), out)
    if logger.start(cfg) is None:
        err_console.print("[yellow]warning:[/] MLflow is unreachable; training without tracking", highlight=False)
    elif not (quiet or as_json):
        err_console.print(f"logging to MLflow run {logger.run_id} (experiment {logger.experiment!r}, "
                          f"source trial {logger.source.get('trial')})", highlight=False)
    state = {}

    def on_epoch(metrics, trainer):
        state["trainer"] = trainer
        logger.on_epoch(metrics, trainer)

    try:
        history, trainer = run_training(cfg, out, quiet=quiet or as_json, on_epoch=on_epoch)
    except KeyboardInterrupt:
        logger.finish("KILLED", cfg, state.get("trainer"))
        raise
    except (FileNotFoundError, ValueError, RuntimeError, FloatingPointError) as exc:  # incl. NonFiniteLossError
        logger.finish("FAILED", cfg, state.get("trainer"))
        raise fail(redact(f"{config}: {exc}"), code=1)
    logger.finish("FINISHED", cfg, trainer)
    if as_json:
        sys.stdout.write(json.dumps({"epochs": history, "final": history[-1], "mlflow_run_id": logger.run_id}) + "\n")
    else:
        Console().print(results_table(history))
        if logger.run_id:
            Console().print(f"MLflow run {logger.run_id} (role=final) in experiment {logger.experiment!r}")
