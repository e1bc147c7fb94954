"""Helpers shared by the oscqat library tests (a uniquely named module: several conftest.py exist)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"


def tiny_train_kwargs(**overrides) -> dict:
    """A small, fast TrainConfig on the built-in digits data (demo net, CPU)."""
    kw = dict(
        arch="demo_net", bits="w3a3", dataset="digits", epochs=2, batch_size=64, optimizer="sgd", lr=0.05,
        weight_decay=5e-5, quantizer_lr=3e-6, bn_reestimate_batches=5, device="cpu", seed=0,
    )
    kw.update(overrides)
    return kw
