"""The QAT training loop: one epoch at a time, with a complete, resumable state.

Each step: forward -> task loss (+ lambda * dampening) -> backward -> weight optimizer and
scale optimizer -> oscillation tracker (frequency EMA, freezing). Each epoch ends with an
evaluation on running BN statistics and, when enabled, another after BN re-estimation.
"""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from oscqat.bn import bn_layers, bn_state, reestimate_bn
from oscqat.compiled import CompiledForward
from oscqat.config import TrainConfig
from oscqat.cost import model_cost
from oscqat.dampening import dampening_loss, enable_fused_dampening
from oscqat.data import DataBundle, build_data
from oscqat.metrics import METRIC_NAMES, TEST_METRICS  # noqa: F401 - re-exported
from oscqat.models import create_model
from oscqat.models.registry import load_state_into, safe_torch_load
from oscqat.oscillation import OscillationTracker
from oscqat.quantize import QuantConfig, quantize_model
from oscqat.quantizer import SCALE_EPS, LSQQuantizer, collapsed_scales
from oscqat.schedules import cosine_lr_factor, dampen_lambda_at, freeze_threshold_at

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/Inf loss; the run cannot continue meaningfully."""


class QuantizerCollapseError(FloatingPointError):
    """A learned quantizer scale reached the floor (``<= SCALE_EPS``, i.e. an optimizer step
    took it to or across 0). Its grid no longer represents the tensor (an unsigned activation
    grid then passes only zeros or one clipped value), so the run would train at chance
    without any error; it is ended instead. ``layers`` names the collapsed quantizers."""

    def __init__(self, message: str, layers: list[str]):
        super().__init__(message)
        self.layers = layers


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but no CUDA device is available")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


class Trainer:
    """Builds model, data and optimizers from a ``TrainConfig`` and trains epoch by epoch.

    ``run_epoch()`` returns that epoch's metrics (names in ``METRIC_NAMES``); ``fit()`` runs the
    remaining epochs. ``save``/``load`` capture everything needed to resume bit-identically on
    CPU: model (scales, frozen masks), both optimizers, tracker, RNG, epoch and history.
    """

    def __init__(self, config: TrainConfig, data: DataBundle | None = None, pretrained_state: dict | None = None):
        """``pretrained_state``: a float state dict to start from (instead of ``config.pretrained``),
        e.g. a campaign's shared FP checkpoint shipped through Ray's object store."""
        self.cfg = config
        seed_everything(config.seed)
        self.device = resolve_device(config.device)
        self.data = data or build_data(config)
        # on a GPU: in-memory sets move there once (or yield pinned batches); on a CPU, nothing changes
        self.data_path = self.data.train.stage(self.device) if hasattr(self.data.train, "stage") else "host"
        for loader in (self.data.val, self.data.test):
            if hasattr(loader, "stage"):
                loader.stage(self.device)
        model = create_model(config.arch, num_classes=self.data.num_classes, pretrained=config.pretrained,
                             in_chans=self.data.in_chans)
        if pretrained_state is not None:
            load_state_into(model, pretrained_state, source="pretrained_state")
        if config.quantized:
            qcfg = QuantConfig(weight_bits=config.weight_bits, act_bits=config.act_bits,
                               per_channel=config.per_channel, scale_init=config.scale_init)
            quantize_model(model, qcfg)
        self.model = model.to(self.device)
        if config.dampens:  # the quantizers compute the dampening term in their own pass
            enable_fused_dampening(self.model, max_bits=config.track_max_bits)
        self.tracker = (
            OscillationTracker(self.model, config.osc_momentum, config.track_max_bits) if config.quantized else None
        )
        self.optimizer, self.quant_optimizer = self._build_optimizers()
        self._quantizers = [(n, m) for n, m in self.model.named_modules() if isinstance(m, LSQQuantizer)]
        self.epoch = 0
        self.global_step = 0
        self.history: list[dict] = []
        self.layer_history: list[dict] = []
        self.steps_per_epoch = max(len(self.data.train), 1)
        self.total_steps = self.steps_per_epoch * config.epochs
        # compile: built once per Trainer (so once per trial), compiled at its first call
        # image batches in channels_last memory format (TrainConfig.memory_format; "auto": on CUDA)
        self.channels_last = config.memory_format == "channels_last" or (
            config.memory_format == "auto" and self.device.type == "cuda")
        self._lam = torch.zeros((), device=self.device)  # lambda as a graph input, not a constant
        self.compiled = CompiledForward(self.model, self._loss_terms) if config.compile else None

    # setup -------------------------------------------------------------------
    def _build_optimizers(self):
        cfg = self.cfg
        scale_params = [m.scale for m in self.model.modules() if isinstance(m, LSQQuantizer)]
        scale_ids = {id(p) for p in scale_params}
        decay, no_decay = [], []
        for module in self.model.modules():
            for name, p in module.named_parameters(recurse=False):
                if id(p) in scale_ids or not p.requires_grad:
                    continue
                is_weight = name == "weight" and isinstance(module, (nn.Conv2d, nn.Linear))
                (decay if is_weight else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if cfg.optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
        else:
            opt = torch.optim.Adam(groups, lr=cfg.lr)
        qopt = torch.optim.Adam(scale_params, lr=cfg.quantizer_lr, weight_decay=0.0) if scale_params else None
        return opt, qopt

    def _set_lr(self) -> float:
        factor = cosine_lr_factor(self.epoch, self.cfg.epochs) if self.cfg.lr_schedule == "cosine" else 1.0
        for g in self.optimizer.param_groups:
            g["lr"] = self.cfg.lr * factor
        if self.quant_optimizer is not None:
            for g in self.quant_optimizer.param_groups:
                g["lr"] = self.cfg.quantizer_lr * factor
        return self.cfg.lr * factor

    @property
    def done(self) -> bool:
        return self.epoch >= self.cfg.epochs

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the run's memory format (channels_last applies to 4-D image batches only)."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def _autocast(self):
        if self.cfg.amp:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    # training ----------------------------------------------------------------
    def _schedules(self) -> tuple[float, float]:
        cfg = self.cfg
        progress = self.global_step / max(self.total_steps, 1)
        lam = dampen_lambda_at(progress, cfg.dampen_lambda, cfg.dampen_start) if cfg.dampens else 0.0
        f_th = (freeze_threshold_at(progress, cfg.freeze_threshold_start, cfg.freeze_threshold_end, cfg.freeze_start)
                if cfg.freezes else 0.0)
        return lam, f_th

    def train_one_epoch(self, on_batch: Callable[[int, float], None] | None = None) -> dict:
        cfg, model = self.cfg, self.model
        model.train()
        self.data.train.set_epoch(self.epoch)
        lr = self._set_lr()
        loss_sum = torch.zeros((), device=self.device)
        damp_sum = torch.zeros((), device=self.device)
        seen = batches = 0
        lam = f_th = 0.0
        compile_before = self.compiled.compile_time_s if self.compiled is not None else 0.0
        graphs_before = self.compiled.graphs_compiled if self.compiled is not None else 0
        for x, y in self.data.train:
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            x = self._layout(x)
            lam, f_th = self._schedules()
            if self.compiled is not None:
                loss, total, damp = self.compiled(x, y, self._lam.fill_(lam))
            else:
                loss, total, damp = self._loss_terms(x, y, lam)
            if damp is not None:
                damp_sum += damp.detach()
            if not math.isfinite(float(loss.detach())):
                raise NonFiniteLossError(
                    f"non-finite training loss ({float(loss.detach())}) at epoch {self.epoch + 1}, step {self.global_step}; "
                    f"lower lr (now {lr:g}) or quantizer_lr ({cfg.quantizer_lr:g})"
                )
            self.optimizer.zero_grad(set_to_none=True)
            if self.quant_optimizer is not None:
                self.quant_optimizer.zero_grad(set_to_none=True)
            backward_start = time.perf_counter()
            total.backward()
            if self.compiled is not None:
                self.compiled.add_backward_time(time.perf_counter() - backward_start)
                if self.tracker is not None:  # the graph keeps no x / s (a pass over the weights): the
                    self.tracker.observe()  # tracker reads the live weights, before the optimizer moves them
            self.optimizer.step()
            if self.quant_optimizer is not None:
                self.quant_optimizer.step()
                self._check_scales()
            if self.tracker is not None:
                self.tracker.step(freeze_threshold=f_th)
            loss_sum += loss.detach() * len(y)
            seen += len(y)
            batches += 1
            self.global_step += 1
            if on_batch is not None:
                on_batch(batches, float(loss.detach()))
        if cfg.quantized and not cfg.dampens:
            with torch.no_grad():  # report the (unweighted) dampening loss of the last step
                damp_sum = dampening_loss(model, cfg.dampen_aggregation, max_bits=cfg.track_max_bits) * batches
        return {
            "train_loss": float(loss_sum) / max(seen, 1),
            "dampen_loss": float(damp_sum) / max(batches, 1) if cfg.quantized else 0.0,
            "dampen_lambda": lam,
            "freeze_threshold": f_th,
            "lr": lr,
            "_samples": seen,
            "compile_time_s": (self.compiled.compile_time_s - compile_before) if self.compiled is not None else 0.0,
            "compile_graphs": (self.compiled.graphs_compiled - graphs_before) if self.compiled is not None else 0,
        }

    def _loss_terms(self, x: torch.Tensor, y: torch.Tensor, lam) -> tuple:
        """``(task loss, loss to backpropagate, dampening loss or None)`` of one training forward.

        The function ``compile`` runs through torch.compile; there ``lam`` is a 0-d tensor (a
        graph input, so the lambda schedule does not recompile) and the total is always
        ``loss + lam * damp`` (equal to ``loss`` at lambda 0)."""
        cfg = self.cfg
        with self._autocast():
            out = self.model(x)
            loss = F.cross_entropy(out.float(), y)
        if not cfg.dampens:
            return loss, loss, None
        damp = dampening_loss(self.model, cfg.dampen_aggregation, max_bits=cfg.track_max_bits)
        if isinstance(lam, torch.Tensor):
            return loss, loss + lam * damp, damp
        return loss, (loss + lam * damp) if lam > 0.0 else loss, damp

    def _check_scales(self) -> None:
        """Raise ``QuantizerCollapseError`` when a scale the optimizer just updated is at the floor.

        Criterion: any learned scale ``<= SCALE_EPS`` after a step. A healthy LSQ scale moves by
        a small fraction of itself per step; reaching 0 means the quantizer learning rate is
        larger than the scale, and the run that follows is an artefact (the forward stays finite
        thanks to the clamp, so nothing else would stop it)."""
        bad = collapsed_scales(self._quantizers)
        if bad:
            names = [name for name, _ in bad]
            shown = ", ".join(f"{name} (scale {low:.3g})" for name, low in bad[:3])
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            raise QuantizerCollapseError(
                f"quantizer scale collapsed to <= {SCALE_EPS:g} in {shown}{more} at epoch {self.epoch + 1}, "
                f"step {self.global_step}; quantizer_lr {self.cfg.quantizer_lr:g} is too large for these scales",
                names)

    @torch.no_grad()
    def evaluate(self, loader=None) -> tuple[float, float]:
        """Mean cross-entropy and top-1 accuracy over ``loader`` (default: the selection split)."""
        loader = loader or self.data.val
        self.model.eval()
        loss_sum, correct, seen = 0.0, 0, 0
        for x, y in loader:
            x, y = self._layout(x.to(self.device, non_blocking=True)), y.to(self.device, non_blocking=True)
            with self._autocast():
                out = self.model(x).float()
            loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            seen += len(y)
        self.model.train()
        return loss_sum / max(seen, 1), correct / max(seen, 1)

    def _bn_batches(self):
        """The training set in its own order, on the device, in the run's memory format."""
        loader = self.data.train
        loader.set_epoch(10_000_019 + self.epoch)  # its own order; training order is unaffected
        return (self._layout(x.to(self.device, non_blocking=True)) for x, _ in loader)

    def run_epoch(self, on_batch: Callable[[int, float], None] | None = None) -> dict:
        """Train one epoch, evaluate (with and without BN re-estimation), return the metrics."""
        if self.done:
            raise RuntimeError(f"training already finished ({self.cfg.epochs} epochs)")
        start = time.perf_counter()
        train = self.train_one_epoch(on_batch)
        train_time = time.perf_counter() - start
        val_loss_raw, top1_raw = self.evaluate()
        val_loss, top1 = val_loss_raw, top1_raw
        last_epoch = self.epoch + 1 >= self.cfg.epochs
        test = dict.fromkeys(TEST_METRICS)
        if last_epoch:
            test_loss, test["test_top1_no_bnre"] = self.evaluate(self.data.test)
            test["test_loss"], test["test_top1"] = test_loss, test["test_top1_no_bnre"]
        if self.cfg.bn_reestimate_batches > 0 and bn_layers(self.model):
            saved = None if last_epoch else bn_state(self.model)
            reestimate_bn(self.model, self._bn_batches(), self.cfg.bn_reestimate_batches)  # batches on the device
            val_loss, top1 = self.evaluate()
            if last_epoch:
                test["test_loss"], test["test_top1"] = self.evaluate(self.data.test)
            if saved is not None:  # keep training on running statistics; the final model keeps re-estimated ones
                self.model.load_state_dict(saved, strict=False)
        osc = self.tracker.summary() if self.tracker is not None else {}
        scale_flips, flips = self.tracker.pop_flip_stats() if self.tracker is not None else (0, 0)
        self.epoch += 1
        metrics = {
            "epoch": self.epoch,
            "train_loss": train["train_loss"],
            "val_loss": val_loss,
            "val_top1": top1,
            "val_top1_no_bnre": top1_raw,
            "dampen_loss": train["dampen_loss"],
            "dampen_lambda": train["dampen_lambda"],
            "freeze_threshold": train["freeze_threshold"],
            "lr": train["lr"],
            "osc_frac": osc.get("osc_frac", 0.0),
            "osc_frac_depthwise": osc.get("osc_frac_depthwise", 0.0),
            "osc_frac_pointwise": osc.get("osc_frac_pointwise", 0.0),
            "frozen_frac": osc.get("frozen_frac", 0.0),
            # share of this epoch's integer changes that the scale's motion caused (see oscillation.py)
            "scale_flip_frac": scale_flips / flips if flips else 0.0,
            "epoch_time_s": time.perf_counter() - start,
            "compile_time_s": train["compile_time_s"],
            "compile_graphs": train["compile_graphs"],
            "samples_per_s": train["_samples"] / max(train_time, 1e-9),
            **self.cost(),
            **test,
        }
        self.history.append(metrics)
        self.layer_history.append(
            {name: {"osc_frac": v["osc_frac"], "frozen_frac": v["frozen_frac"], "kind": v["kind"]}
             for name, v in osc.get("layers", {}).items()}
        )
        log.info("epoch %d/%d val_top1=%.4f osc=%.4f frozen=%.4f", self.epoch, self.cfg.epochs, top1,
                 metrics["osc_frac"], metrics["frozen_frac"])
        return metrics

    def cost(self) -> dict[str, float]:
        """``model_size_kb`` and ``bops_g`` (``oscqat.cost``): fixed by the architecture and bit-widths,
        so computed once, after the first epoch has calibrated the quantizers."""
        if getattr(self, "_cost", None) is None:
            size = self.data.image_size
            self._cost = model_cost(self.model, (self.data.in_chans, size, size))
        return self._cost

    def fit(self, on_epoch: Callable[[dict], None] | None = None) -> list[dict]:
        """Run the remaining epochs; returns the full history."""
        while not self.done:
            metrics = self.run_epoch()
            if on_epoch is not None:
                on_epoch(metrics)
        return self.history

    # persistence --------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {
            "version": CHECKPOINT_VERSION,
            "config": self.cfg.model_dump(mode="json"),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "quant_optimizer": self.quant_optimizer.state_dict() if self.quant_optimizer else None,
            "tracker": self.tracker.state_dict() if self.tracker else None,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "history": self.history,
            "layer_history": self.layer_history,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "rng_python": list(random.getstate()[1]),
        }
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"unsupported checkpoint version {state.get('version')!r}")
        self.model.load_state_dict(state["model"])  # quantized layers rebuild their frozen index here
        self.optimizer.load_state_dict(state["optimizer"])
        if self.quant_optimizer is not None and state["quant_optimizer"] is not None:
            self.quant_optimizer.load_state_dict(state["quant_optimizer"])
        if self.tracker is not None and state["tracker"] is not None:
            self.tracker.load_state_dict(state["tracker"])
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.history = list(state["history"])
        self.layer_history = list(state.get("layer_history", []))
        torch.set_rng_state(state["rng_cpu"])
        if state.get("rng_cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        if state.get("rng_python"):
            random.setstate((3, tuple(int(v) for v in state["rng_python"]), None))

    def save(self, path: str | Path) -> Path:
        """Write the full training state atomically (temp file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(self.state_dict(), tmp)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, config: TrainConfig | None = None, data: DataBundle | None = None) -> "Trainer":
        """Rebuild a Trainer from a checkpoint (its own config unless one is given)."""
        state = safe_torch_load(path)
        cfg = config or TrainConfig.model_validate(state["config"])
        trainer = cls(cfg, data=data)
        trainer.load_state_dict(state)
        return trainer

    def save_model(self, path: str | Path) -> Path:
        """Write only the model state dict (a float or QAT checkpoint for ``pretrained``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(self.model.state_dict(), tmp)
        tmp.replace(path)
        return path
