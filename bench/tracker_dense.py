"""Benchmark: the tracker's dense step (gather the integers, find the ones that moved), eager
against the same work through torch.compile (Inductor), on MobileNetV2's W4A4 weight shapes.

Why it exists: it decided where a compiled training step does this work. Compiled, the work is
no faster than eager, and a graph that also returns the mask's unaligned tail (the last
``numel % 64`` entries, which the block search needs) became one slow fused kernel: so
``TrainConfig.compile`` leaves the work to the eager tracker (``OscillationTracker.observe``).

    python bench/tracker_dense.py [--rounds 60] [--threads 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from oscqat import QuantConfig, create_model, quant_layers, quantize_model

BLOCK = 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model("mobilenet_v2", num_classes=10)
    quantize_model(model, QuantConfig(weight_bits=4, act_bits=4))
    shapes = [layer.weight.shape for _, layer in quant_layers(model) if layer.weight_bits <= 4]
    parts = [torch.randint(-8, 8, s).float() for s in shapes]
    prev = torch.cat([p.reshape(-1) for p in parts])
    n = prev.numel()
    prev[torch.randperm(n)[: n // 1000]] += 1  # 0.1% of the integers moved, as in training
    spare, delta = torch.empty(n), torch.empty(n)
    cut = n // BLOCK * BLOCK

    def eager():  # what OscillationTracker does: concat into a kept buffer, subtract, block search
        x = torch.cat([p.reshape(-1) for p in parts], out=spare)
        blocks = torch.sub(x, prev, out=delta)[:cut].view(-1, BLOCK)
        hit = torch.nonzero(torch.linalg.vector_norm(blocks, dim=1)).squeeze(1)
        local = torch.nonzero(blocks[hit])
        return hit[local[:, 0]] * BLOCK + local[:, 1]

    def dense(parts, prev):  # the same, as one function for Inductor (concat, compare, block any)
        x = torch.cat([p.reshape(-1) for p in parts])
        changed = x != prev
        return x, changed[:cut].view(-1, BLOCK).any(dim=1)

    def dense_tail(parts, prev):  # the same, also returning the unaligned tail of the mask
        x = torch.cat([p.reshape(-1) for p in parts])
        changed = x != prev
        return x, changed[:cut].view(-1, BLOCK).any(dim=1), changed[cut:]

    dense_c = torch.compile(dense, dynamic=False)
    dense_tail_c = torch.compile(dense_tail, dynamic=False)

    def compiled():
        x, hits = dense_c(parts, prev)
        hit = torch.nonzero(hits).squeeze(1)
        rows = x[:cut].view(-1, BLOCK).index_select(0, hit) != prev[:cut].view(-1, BLOCK).index_select(0, hit)
        local = torch.nonzero(rows)
        return hit.index_select(0, local[:, 0]) * BLOCK + local[:, 1]

    def compiled_tail():
        return dense_tail_c(parts, prev)

    if not torch.equal(eager(), compiled()):
        raise RuntimeError("eager and compiled found different moved integers")
    fns = {"eager": eager, "compiled": compiled, "compiled+tail": compiled_tail}
    times = {name: [] for name in fns}
    for r in range(args.rounds):
        for name in random.Random(r).sample(list(times), len(times)):
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    paired = {name: statistics.median(c / e for c, e in zip(times[name], times["eager"]))
              for name in fns if name != "eager"}
    print(f"{len(shapes)} layers, {n} tracked weights, {args.threads} threads, {args.rounds} rounds")
    for name, t in med.items():
        extra = f"   ({paired[name]:.2f}x eager, paired)" if name in paired else ""
        print(f"{name:<14}{t * 1000:>8.2f} ms{extra}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"layers": len(shapes), "weights": n, "median_s": med, "over_eager_paired": paired,
                       "threads": args.threads, "rounds": args.rounds, "torch": torch.__version__}, fh, indent=2)


if __name__ == "__main__":
    main()
