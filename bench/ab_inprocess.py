"""Step time of the library at a git commit against the working tree, in one process.

On a shared VM the host's speed drifts by 20-40% within minutes, more than a change to the step
usually moves it (1-2%), so two runs of ``bench/step_time.py``, one per checkout, cannot be
compared. This script loads the library at ``--before`` as a renamed copy (``oscqat_before``,
extracted with ``git archive``), builds the same ``bench/step_time.py`` Variants from both
versions, and steps them round by round in alternating order, so each round's ratio pairs
steps taken seconds apart (median and distribution-free 95% interval, ``oscqat.stats.median_ci``).

Before each step the global RNG is reseeded with the round number, so a before/after pair
draws the same dropout masks. A change that should not alter the numbers then leaves both
sides bit-identical, and the script reports how far their weights and frozen sets moved apart.

    python bench/ab_inprocess.py --before HEAD~1 [--variants "compiled lsq,compiled full"]
                                 [--rounds 500] [--threads 2] [--repo DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
IMPORT = re.compile(r"\boscqat(?=[.\s]|$)", re.M)  # the package name in imports and import_module strings


def load_before(commit: str, into: Path, repo: Path = ROOT):
    """``bench/step_time.py`` of ``commit`` in ``repo``, importing that commit's library as ``oscqat_before``."""
    archive = subprocess.run(["git", "-C", str(repo), "archive", commit, "oscqat", "bench/step_time.py"],
                             capture_output=True, check=False)
    if archive.returncode != 0:
        raise SystemExit(f"ab_inprocess: cannot read {commit!r} from git: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    (into / "oscqat").rename(into / "oscqat_before")
    sources = list((into / "oscqat_before").rglob("*.py")) + [into / "bench" / "step_time.py"]
    for path in sources:
        path.write_text(IMPORT.sub("oscqat_before", path.read_text()))
    (into / "bench" / "step_time.py").rename(into / "step_time_before.py")
    sys.path.insert(0, str(into))
    import step_time_before

    return step_time_before


def max_weight_gap(a, b) -> float:
    pa, pb = dict(a.model.named_parameters()), dict(b.model.named_parameters())
    with torch.no_grad():
        return max(float((pa[k] - pb[k]).abs().max()) for k in pa)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="git commit (or ref) of the library to compare against")
    parser.add_argument("--variants", default="compiled lsq,compiled full",
                        help="comma-separated bench/step_time.py variants, each run in both versions")
    parser.add_argument("--rounds", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repo", default=str(ROOT), help="git repository holding --before (default: this checkout)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
    from bench import step_time as after
    from oscqat.stats import median_ci

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    known = {**after.VARIANTS, **after.COMPILED_VARIANTS, **after.DIAGNOSTIC_VARIANTS}
    unknown = [v for v in variants if v not in known]
    if unknown:
        raise SystemExit(f"ab_inprocess: unknown variants {unknown}; known: {sorted(known)}")
    # the copy stays on disk until the end: the library imports some modules lazily
    with tempfile.TemporaryDirectory(prefix="ab_before_") as tmp:
        before = load_before(args.before, Path(tmp), Path(args.repo))
        runs = {}
        for v in variants:
            for side, module in (("before", before), ("after", after)):
                name = f"{side} {v}"
                runs[name] = module.Variant(v, args.bits, args.batch, args.size)
                t0 = time.perf_counter()
                for i in range(args.warmup):
                    torch.manual_seed(10_000 + i)
                    runs[name].step()
                print(f"{name}: ready in {time.perf_counter() - t0:.1f} s", flush=True)
        names = list(runs)
        times = {n: [] for n in names}
        for r in range(args.rounds):
            for n in names if r % 2 == 0 else names[::-1]:
                torch.manual_seed(r)
                t0 = time.perf_counter()
                runs[n].step()
                times[n].append(time.perf_counter() - t0)

        def paired(a: str, b: str) -> dict:
            ratios = [x / y for x, y in zip(times[a], times[b])]
            ci = median_ci(ratios)
            return {"paired": statistics.median(ratios), "ci95": list(ci) if ci else None,
                    "of_medians": statistics.median(times[a]) / statistics.median(times[b])}

        result = {"before": args.before, "rounds": args.rounds, "threads": args.threads,
                  "median_ms": {n: statistics.median(t) * 1e3 for n, t in times.items()},
                  "phases_ms": {n: {p: statistics.median(s[args.warmup:]) * 1e3 for p, s in runs[n].phases.items()}
                                for n in names},
                  "after_over_before": {v: paired(f"after {v}", f"before {v}") for v in variants},
                  "over_first_variant": {f"{side} {v}": paired(f"{side} {v}", f"{side} {variants[0]}")
                                         for v in variants[1:] for side in ("before", "after")},
                  "identical": {}}
        for v in variants:
            a, b = runs[f"before {v}"], runs[f"after {v}"]
            entry = {"max_weight_gap": max_weight_gap(a, b)}
            if a.tracker is not None and b.tracker is not None:
                entry["frozen_frac"] = [a.tracker.summary()["frozen_frac"], b.tracker.summary()["frozen_frac"]]
            result["identical"][v] = entry
        print(f"\n{'variant':34s} {'median (ms)':>11s}   phases (ms)")
        for n in names:
            phases = "  ".join(f"{p} {t:.2f}" for p, t in result["phases_ms"][n].items())
            print(f"{n:34s} {result['median_ms'][n]:11.1f}   {phases}")
        print()
        for key, group in (("after / before", result["after_over_before"]), ("over first", result["over_first_variant"])):
            for name, r in group.items():
                ci = "-".join(f"{c:.4f}" for c in r["ci95"]) if r["ci95"] else "n/a"
                label = f"after {name} / before {name}" if key == "after / before" else f"{name} / {name.split(' ', 1)[0]} {variants[0]}"
                print(f"{label:60s} paired {r['paired']:.4f} [{ci}]  of medians {r['of_medians']:.4f}")
        for v, entry in result["identical"].items():
            print(f"{v}: before/after weights differ by at most {entry['max_weight_gap']:.3g}"
                  + (f", frozen fraction {entry['frozen_frac'][0]:.5f} / {entry['frozen_frac'][1]:.5f}" if "frozen_frac" in entry else ""))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
