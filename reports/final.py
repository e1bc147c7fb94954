"""Final training of an exported config, logged to MLflow as a run linked to its campaign.

``oscqat train best.yaml`` gets this module's hook (``final_run_hook``, passed in by the root
CLI) when the YAML carries the ``# oscqat-source:`` header that ``report export`` writes. The
library (``oscqat``) stays free of MLflow: it only calls the hook. The run (role=final,
stage=final) keeps its model: ``model.pt`` and its config as an MLflow logged model of the run
(and run artifacts under ``model/``); ``oscqat export onnx`` adds the ONNX file and
``parity.json`` to both (``log_export``). Tracking never stops training: if the server is
unreachable the run trains untracked, with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from reports.header import SOURCE_KEY, parse_source, read_header
from search.uris import redact

log = logging.getLogger(__name__)
MODEL_FILE = "model.pt"  # oscqat.export.bundle.MODEL_FILE
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
        self._writer = None  # search.run_writer.BufferedWriter, made with the run

    @property
    def writer(self):
        """The buffered writer of this run's epochs and end (an epoch lost to an outage is retried)."""
        if self._writer is None:
            from search.run_writer import BufferedWriter

            self._writer = BufferedWriter(retry_interval_s=0.0)  # an epoch is long: retry at every one
        return self._writer

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

    def start(self, cfg) -> str:
        """``TrainHook.start``: open the run; the line to show the user."""
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        if self.open_run(cfg) is None:
            return "[yellow]warning:[/] MLflow is unreachable; training without tracking"
        return (f"logging to MLflow run {self.run_id} (experiment {self.experiment!r}, "
                f"source trial {self.source.get('trial')})")

    def summary(self) -> dict:
        return {"mlflow_run_id": self.run_id}

    def open_run(self, cfg) -> str | None:
        """Create (or, when resuming in the same --out, reopen) the run; None if MLflow is unreachable."""
        from search.run_writer import param_batches
        from search.tracking import TAG, get_or_create_experiment, safe_value

        def create():
            self.experiment_id = get_or_create_experiment(self.client, self.experiment)
            previous = self._previous_run_id()
            if previous:
                self.run_id = previous
                self.client.update_run(previous, status="RUNNING")
                return
            tags = {f"{TAG}role": "final", f"{TAG}stage": "final", f"{TAG}campaign": self.source.get("campaign", ""),
                    f"{TAG}target": self.source.get("target", ""),
                    f"{TAG}source_trial_id": self.source.get("trial", ""),
                    f"{TAG}source_rank": self.source.get("rank", ""),
                    f"{TAG}source_run_id": self.header.get("trial-run", ""),
                    f"{TAG}parent_run_id": self.header.get("parent-run", ""),
                    f"{TAG}arch": cfg.arch, f"{TAG}bits": cfg.bits}
            run = self.client.create_run(self.experiment_id, run_name=final_run_name(cfg, self.source.get("trial")),
                                         tags={k: safe_value(k, v) for k, v in tags.items() if v})
            self.run_id = run.info.run_id
            for batch in param_batches(cfg.model_dump(mode="json")):
                self.client.log_batch(self.run_id, params=batch)
            if self.out is not None:
                self.out.mkdir(parents=True, exist_ok=True)
                self._write_run_file()

        if not self._try(f"create the final-training run in {self.experiment!r}", create):
            self.run_id = None
        return self.run_id

    def _write_run_file(self, **extra) -> None:
        from search.searcher import redact

        data = {"run_id": self.run_id, "tracking_uri": redact(self.tracking_uri),
                "experiment_id": self.experiment_id, **extra}
        (self.out / RUN_FILE).write_text(json.dumps(data))

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
        from search.run_writer import finite_metrics

        step = int(metrics["epoch"])
        batch = finite_metrics(metrics, step)
        self.writer.write(f"epoch {step}", lambda: self.client.log_batch(self.run_id, metrics=batch))

    def finish(self, status: str, cfg=None, trainer=None) -> str:
        """``TrainHook.finish``: flush, log artifacts (and the model when FINISHED), end the run."""
        if self.run_id is None:
            return ""
        if not self.writer.flush(force=True):
            log.warning("MLflow: %d epoch(s) of the final run could not be logged", len(self.writer.pending))
        if trainer is not None and cfg is not None:
            self._try("log artifacts", lambda: self._log_artifacts(cfg, trainer))
            if status == "FINISHED" and self.out is not None and (self.out / MODEL_FILE).is_file():
                self._try("log the model", lambda: self._log_model(cfg, trainer))
        self._try(f"mark the run {status}", lambda: self.client.set_terminated(self.run_id, status))
        return f"MLflow run {self.run_id} (role=final) in experiment {self.experiment!r}"

    def _log_model(self, cfg, trainer) -> None:
        """``model.pt`` + its config as the run's logged model (MLflow 3 'Logged models') and as run
        artifacts under ``model/``; the model id goes into ``mlflow_run.json`` for ``log_export``."""
        from mlflow.entities import LoggedModelOutput

        from search.tracking import TAG

        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            shutil.copy2(self.out / MODEL_FILE, tmp / MODEL_FILE)
            (tmp / "train_config.yaml").write_text(cfg.to_yaml())
            self.client.log_artifacts(self.run_id, str(tmp), "model")
            if self.experiment_id is None:
                self.experiment_id = self.client.get_run(self.run_id).info.experiment_id
            model = self.client.create_logged_model(
                self.experiment_id, name=f"{cfg.arch}-{cfg.bits}", source_run_id=self.run_id, model_type="oscqat",
                tags={f"{TAG}stage": "final", f"{TAG}arch": cfg.arch, f"{TAG}bits": cfg.bits})
            self.client.log_model_artifacts(model.model_id, str(tmp))
            self.client.finalize_logged_model(model.model_id, "READY")
            self.client.log_outputs(self.run_id, [LoggedModelOutput(model.model_id, int(trainer.epoch))])
        self._write_run_file(model_id=model.model_id)

    def _log_artifacts(self, cfg, trainer) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            from search.run_writer import CONFIG_FILE, write_layer_oscillations

            (tmp / CONFIG_FILE).write_text(cfg.to_yaml())
            (tmp / "metrics.json").write_text(json.dumps({"epochs": trainer.history}, indent=2))
            layer_hist = [{"epoch": i + 1, "layers": {k: v["osc_frac"] for k, v in layers.items()}}
                          for i, layers in enumerate(trainer.layer_history)]
            write_layer_oscillations(tmp, layer_hist)
            if layer_hist and layer_hist[-1]["layers"]:
                from search.plots import layer_oscillation_plot

                layer_oscillation_plot(layer_hist, tmp / "layer_oscillations.png", title="final")
            self.client.log_artifacts(self.run_id, str(tmp))


def final_run_name(cfg, trial_id: str | None) -> str:
    """``final · w3a3 · dampen · f9ba8107``: what a row of the runs table is, in the trial runs' form."""
    return " · ".join(["final", cfg.bits, cfg.method, *([trial_id] if trial_id else [])])


def final_run_hook(config: Path, out: Path) -> FinalRunLogger | None:
    """The ``oscqat train`` hook: a final run for an exported config, None for a plain config."""
    header = read_header(config)
    return FinalRunLogger(header, out) if SOURCE_KEY in header else None


PARITY_METRICS = ("top1_agreement", "onnx_test_top1", "torch_test_top1", "max_abs_logit_diff", "mean_abs_logit_diff")


def log_export(run_dir: Path, files: list[Path], parity: dict | None) -> str:
    """The ``oscqat export onnx`` hook: attach the ONNX file and parity to the run's final run
    (found through ``mlflow_run.json`` in the run directory); "" for an untracked run."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return ""
    from mlflow.entities import Metric

    from search.tracking import TAG, client_for

    try:
        info = json.loads(path.read_text())
        uri = info["tracking_uri"]
        if "***" in uri:
            uri = os.environ.get("MLFLOW_TRACKING_URI", uri)
        client, run_id = client_for(uri), info["run_id"]
        with tempfile.TemporaryDirectory() as tmp:
            for f in files:
                shutil.copy2(f, Path(tmp) / f.name)
            client.log_artifacts(run_id, tmp, "model")
            if info.get("model_id"):
                client.log_model_artifacts(info["model_id"], tmp)
        if parity is not None:
            ts = int(time.time() * 1000)
            metrics = [Metric(f"parity_{k}", float(parity[k]), ts, 0) for k in PARITY_METRICS]
            metrics.append(Metric("parity_weights_bit_exact", float(parity["weights_bit_exact"]), ts, 0))
            client.log_batch(run_id, metrics=metrics)
            client.set_tag(run_id, f"{TAG}parity", "passed" if parity["passed"] else "failed")
    except Exception as exc:  # noqa: BLE001 - the export is written either way
        log.warning("MLflow: could not log the export (%s: %s)", exc.__class__.__name__, redact(str(exc)).splitlines()[0][:200])
        return "[yellow]warning:[/] could not log the export to MLflow"
    return f"logged to MLflow run {run_id}"
