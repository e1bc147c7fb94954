"""Benchmark: the cost of one QAT training step, and of oscillation handling on top of it.

MobileNetV2 at 32x32, batch 64, CPU. Variants run interleaved (round-robin, alternating order),
after warm-up. Each ratio is the median over rounds of the per-round ratio, so the two sides of
a ratio are always measured seconds apart and host noise (which swings single steps by +-20% on
a shared VM) cancels; the ratio of the medians is reported alongside, and a distribution-free
95% interval of each paired median (``oscqat.stats.median_ci``). Fewer variants put a ratio's
two sides closer in time: ``--variants`` with two or three and many rounds gives the tightest
interval.

With ``--compile`` it adds the same step with forward and backward through torch.compile
(``TrainConfig.compile``: ``oscqat.compiled.CompiledForward``) for fp32, lsq, full and a second
lsq model (the compiled A/A control); the compilation happens in the warm-up and is reported
(``compile_s``), not timed. ``--variants`` runs a comma-separated subset, including the
diagnostic compiled lsq+dampen, lsq+track and lsq+track+freeze that split the compiled full
step's overhead into its parts.

    python bench/step_time.py [--json FILE] [--rounds 15] [--threads 2] [--compile]
                              [--variants "compiled lsq,compiled full"]
"""

from __future__ import annotations

import argparse
import random
import json
import platform
import statistics
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F
from bench_common import loadavg

from oscqat import OscillationTracker, QuantConfig, create_model, dampening_loss, quantize_model
from oscqat.compiled import CompiledForward
from oscqat.dampening import enable_fused_dampening
from oscqat.stats import median_ci

VARIANTS = {
    # name: (quantized, track, freeze, dampen)
    "fp32": (False, False, False, False),
    "lsq": (True, False, False, False),
    "lsq+track": (True, True, False, False),
    "lsq+track+freeze": (True, True, True, False),
    "lsq+dampen": (True, False, False, True),
    "full": (True, True, True, True),
    "lsq (A/A control)": (True, False, False, False),  # a second plain-LSQ model: the noise floor
}
COMPILED_VARIANTS = {"compiled fp32": "fp32", "compiled lsq": "lsq", "compiled full": "full",  # --compile
                     "compiled lsq (A/A control)": "lsq (A/A control)"}
# where a compiled full step's extra time goes (only with --variants)
DIAGNOSTIC_VARIANTS = {"compiled lsq+dampen": "lsq+dampen", "compiled lsq+track": "lsq+track",
                       "compiled lsq+track+freeze": "lsq+track+freeze"}


RATIOS = {  # name: (numerator, denominator)
    "lsq_over_fp32": ("lsq", "fp32"),
    "track_over_lsq": ("lsq+track", "lsq"),
    "track_freeze_over_lsq": ("lsq+track+freeze", "lsq"),
    "dampen_over_lsq": ("lsq+dampen", "lsq"),
    "full_over_lsq": ("full", "lsq"),
    "control_over_lsq": ("lsq (A/A control)", "lsq"),
}
COMPILED_RATIOS = {
    "compiled_lsq_over_compiled_fp32": ("compiled lsq", "compiled fp32"),
    "compiled_full_over_compiled_lsq": ("compiled full", "compiled lsq"),
    "compiled_control_over_compiled_lsq": ("compiled lsq (A/A control)", "compiled lsq"),
    "compiled_fp32_over_fp32": ("compiled fp32", "fp32"),
    "compiled_lsq_over_lsq": ("compiled lsq", "lsq"),
    "compiled_full_over_full": ("compiled full", "full"),
    "compiled_dampen_over_compiled_lsq": ("compiled lsq+dampen", "compiled lsq"),
    "compiled_track_over_compiled_lsq": ("compiled lsq+track", "compiled lsq"),
    "compiled_track_freeze_over_compiled_lsq": ("compiled lsq+track+freeze", "compiled lsq"),
}
# where a step's time goes: forward (with the loss and dampening), backward, the two optimizer
# steps, and the tracker (its update, freezing and pinning; compiled, observe() plus step())
PHASES = ("forward", "backward", "optimizer", "tracker")
TARGETS = {"full_over_lsq": 1.05, "lsq_over_fp32": 1.5, "compiled_lsq_over_compiled_fp32": 1.15,
           "compiled_full_over_compiled_lsq": 1.03}


class Variant:
    def __init__(self, name: str, bits: int, batch: int, size: int, seed: int = 0):
        kinds = {**COMPILED_VARIANTS, **DIAGNOSTIC_VARIANTS}
        compiled = name in kinds
        quantized, self.track, self.freeze, self.dampen = VARIANTS[kinds.get(name, name)]
        torch.manual_seed(seed)
        self.model = create_model("mobilenet_v2", num_classes=10)  # same seed: same weights for all
        if quantized:
            quantize_model(self.model, QuantConfig(weight_bits=bits, act_bits=bits))
        self.x = torch.randn(batch, 3, size, size)
        self.y = torch.randint(0, 10, (batch,))
        self.model.train()
        scales = [p for n, p in self.model.named_parameters() if n.endswith("scale")]
        ids = {id(p) for p in scales}
        self.opt = torch.optim.SGD([p for p in self.model.parameters() if id(p) not in ids], lr=1e-3, momentum=0.9,
                                   weight_decay=5e-5)
        self.qopt = torch.optim.Adam(scales, lr=1e-5) if scales else None
        self.tracker = OscillationTracker(self.model, momentum=1e-3, max_bits=bits) if self.track else None
        self.model(self.x)  # calibrate quantizer scales (eager, as a Trainer's first step)
        if self.tracker is not None:
            self.tracker.step()  # the calibration forward is a Trainer's first (eager) step: track it too
        # Freeze with a threshold that some weights do cross, so the frozen path is exercised.
        self.threshold = 5e-4 if self.freeze else 0.0
        if self.dampen:  # as the Trainer does
            enable_fused_dampening(self.model, max_bits=8)
        self.lam = torch.tensor(0.1)
        self.compiled = CompiledForward(self.model, self._loss) if compiled else None
        self.phases: dict[str, list[float]] = {phase: [] for phase in PHASES}  # seconds per step

    def _loss(self, x, y, lam):
        loss = F.cross_entropy(self.model(x), y)
        if self.dampen:
            loss = loss + lam * dampening_loss(self.model, "kernel_mean", max_bits=8)
        return loss, loss, None

    def step(self) -> None:
        t0 = time.perf_counter()
        if self.compiled is not None:
            loss = self.compiled(self.x, self.y, self.lam)[1]
        else:
            loss = self._loss(self.x, self.y, 0.1)[1]
        self.opt.zero_grad(set_to_none=True)
        if self.qopt:
            self.qopt.zero_grad(set_to_none=True)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        if self.compiled is not None:  # AOTAutograd compiles the backward at the first backward
            self.compiled.add_backward_time(t2 - t1)
            if self.tracker is not None:  # as the Trainer does: the update half before the optimizer step
                self.tracker.observe()
        t2b = time.perf_counter()
        self.opt.step()
        if self.qopt:
            self.qopt.step()
        t3 = time.perf_counter()
        if self.tracker is not None:
            self.tracker.step(freeze_threshold=self.threshold)
        t4 = time.perf_counter()
        for phase, seconds in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2b, t4 - t3 + t2b - t2)):
            self.phases[phase].append(seconds)


def run(rounds: int, warmup: int, bits: int, batch: int, size: int, steps_per_round: int,
        compile: bool = False, only: list[str] | None = None) -> dict:
    names = only or list(VARIANTS) + (list(COMPILED_VARIANTS) if compile else [])
    ratios = {key: pair for key, pair in {**RATIOS, **COMPILED_RATIOS}.items() if set(pair) <= set(names)}
    variants = {name: Variant(name, bits, batch, size) for name in names}
    compile_s = {}
    for name, v in variants.items():
        t0 = time.perf_counter()
        for _ in range(warmup):
            v.step()
        if v.compiled is not None:
            compile_s[name] = v.compiled.compile_time_s
            if v.compiled.graphs_compiled != 1 or v.compiled.eager_calls:
                raise RuntimeError(f"{name}: {v.compiled.graphs_compiled} graphs, {v.compiled.eager_calls} eager calls")
            print(f"{name}: compiled in {compile_s[name]:.1f} s (warm-up {time.perf_counter() - t0:.1f} s)", flush=True)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        order = list(variants)
        random.Random(r).shuffle(order)  # no variant always runs right after another
        for name in order:
            t0 = time.perf_counter()
            for _ in range(steps_per_round):
                variants[name].step()
            times[name].append((time.perf_counter() - t0) / steps_per_round)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    for v in variants.values():  # the phases of the timed steps only
        for phase in PHASES:
            del v.phases[phase][:warmup]
    phases = {name: {phase: statistics.median(v.phases[phase]) for phase in PHASES} for name, v in variants.items()}

    def per_round(num: str, den: str) -> list[float]:
        return [a / b for a, b in zip(times[num], times[den])]

    frozen = {name: variants[name].tracker.summary()["frozen_frac"] for name in ("full", "compiled full")
              if name in variants}
    for name, v in variants.items():  # freezing never recompiled the graph during the timed rounds
        if v.compiled is not None and v.compiled.graphs_compiled != 1:
            raise RuntimeError(f"{name} recompiled: {variants[name].compiled.graphs_compiled} graphs")
    return {
        "median_step_s": med,
        "median_phase_s": phases,
        "ratios": {key: statistics.median(per_round(num, den)) for key, (num, den) in ratios.items()},
        # distribution-free 95% interval of each paired median (None with under 6 rounds)
        "ratios_ci95": {key: median_ci(per_round(num, den)) for key, (num, den) in ratios.items()},
        "ratios_of_medians": {key: med[num] / med[den] for key, (num, den) in ratios.items()},
        **({"full_variant_frozen_frac": frozen["full"]} if "full" in frozen else {}),
        **({"compiled_full_variant_frozen_frac": frozen["compiled full"]} if "compiled full" in frozen else {}),
        **({"compile_s": compile_s} if compile_s else {}),
        "step_s_per_round": times,  # the raw data, in round order
        "phase_s_per_step": {name: v.phases for name, v in variants.items()},  # timed steps, in order
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write results to this file")
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps-per-round", type=int, default=1)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--compile", action="store_true", help="add compiled fp32, lsq and full variants")
    known = [*VARIANTS, *COMPILED_VARIANTS, *DIAGNOSTIC_VARIANTS]
    ap.add_argument("--variants", help="comma-separated subset to run (ratios whose two sides both ran); "
                    f"one of: {', '.join(known)}")
    args = ap.parse_args()
    only = None
    if args.variants:
        only = [name.strip() for name in args.variants.split(",") if name.strip()]
        unknown = [name for name in only if name not in known]
        if unknown or not only:
            ap.error(f"--variants: unknown {unknown or 'empty list'}; choose from {known}")
    loadavg_before = loadavg()
    if args.threads:
        torch.set_num_threads(args.threads)
    if (args.compile or any(name.startswith("compiled") for name in only or [])) and args.warmup < 2:
        ap.error("--compile needs --warmup >= 2 (the first compiles, the rest are timed warm)")
    res = run(args.rounds, args.warmup, args.bits, args.batch, args.size, args.steps_per_round, args.compile, only)
    res["setup"] = {"model": "mobilenet_v2", "input": f"{args.batch}x3x{args.size}x{args.size}",
                    "bits": f"w{args.bits}a{args.bits}", "rounds": args.rounds, "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                    "cpus": torch.get_num_threads(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "loadavg_before": loadavg_before}
    targets = TARGETS
    print(f"{'variant':<28}{'median step (ms)':>18}")
    for name, t in res["median_step_s"].items():
        print(f"{name:<28}{t * 1000:>18.1f}")
    print(f"\n{'median per phase (ms)':<28}" + "".join(f"{phase:>11}" for phase in PHASES))
    for name, phases in res["median_phase_s"].items():
        print(f"{name:<28}" + "".join(f"{phases[phase] * 1000:>11.1f}" for phase in PHASES))
    print("\ncontrol_over_lsq (compiled: compiled_control_over_compiled_lsq) compares two identical")
    print("plain-LSQ models: its distance from 1.000 is this run's noise floor (memory layout, host")
    print("noise) for every other ratio.")
    print()
    print(f"{'ratio':<42}{'paired':>8}{'95% CI':>16}{'of medians':>12}")
    for key, value in res["ratios"].items():
        target, ci = targets.get(key), res["ratios_ci95"][key]
        verdict = ""
        if target is not None:
            verdict = "  (target <= %.2f: %s" % (target, "met" if value <= target else "MISSED")
            if ci is not None and ci[0] <= target < ci[1]:
                verdict += ", the interval spans it"
            verdict += ")"
        ci_text = "-" if ci is None else f"{ci[0]:.3f}-{ci[1]:.3f}"
        print(f"{key:<42}{value:>8.3f}{ci_text:>16}{res['ratios_of_medians'][key]:>12.3f}{verdict}")
    res["setup"]["loadavg_after"] = loadavg()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
