"""The paper's reported ImageNet top-1 (docs/PAPER.md), to plot beside our results.

Only the architectures the paper evaluated have numbers; everything else is shown as ours only.
"""

from __future__ import annotations

# arch -> bits -> method -> top-1 (%); methods use TrainConfig names ("dampen" = LSQ + dampening).
PAPER_TOP1: dict[str, dict[str, dict[str, float]]] = {
    "mobilenet_v2": {"w4a4": {"lsq": 69.5, "dampen": 70.5, "freeze": 70.6},
                     "w3a3": {"lsq": 65.3, "dampen": 67.8, "freeze": 67.6}},
    "mobilenet_v3_small": {"w4a4": {"lsq": 61.0, "dampen": 63.7, "freeze": 63.6},
                           "w3a3": {"lsq": 52.0, "dampen": 59.0, "freeze": 58.9}},
    "efficientnet_lite0": {"w4a4": {"lsq": 72.3, "dampen": 73.5, "freeze": 73.5},
                           "w3a3": {"lsq": 69.7, "dampen": 71.1, "freeze": 71.0}},
}
PAPER_FP_TOP1 = {"mobilenet_v2": 71.7, "mobilenet_v3_small": 65.1, "efficientnet_lite0": 75.4}
PAPER_NOTES = {("efficientnet_lite0", "w4a4", "lsq"): "an author later said this cell may be 73.2"}
PAPER_SOURCE = ("Nagel et al., Overcoming Oscillations in Quantization-Aware Training, ICML 2022 "
                "(ImageNet top-1; table and source in docs/PAPER.md)")


def paper_numbers(arch: str) -> dict[str, dict[str, float]] | None:
    """``{bits: {method: top1 %}}`` for an architecture the paper evaluated, else None."""
    return PAPER_TOP1.get(arch)
