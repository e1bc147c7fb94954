#!/usr/bin/env bash
# GPU check for oscqat, for a machine with one NVIDIA GPU; at most ~8 minutes; prints a table last.
#
#   1. environment: nvidia-smi, Python, torch (+ CUDA), and the packages each section needs;
#   2. MobileNetV2 QAT throughput (images/s) on synthetic 224x224 data, batch 128: FP32 training
#      (bits fp32) vs W4A4 LSQ and W4A4 dampen+freeze, each in fp32 and with bf16 autocast
#      (TrainConfig amp), measured two ways: the Trainer's own epoch loop (its data path, as a run
#      sees it) and the same loop over a batch already on the GPU; the rows use the Trainer's default
#      layout (TrainConfig memory_format auto: channels_last inputs on CUDA since 2026-12-04);
#   2b. the same with TrainConfig compile (torch.compile, Inductor): compiled fp32, fp32 +bf16, lsq,
#      dampen+freeze, dampen+freeze +bf16, with each compilation time; rows are written as they finish;
#   2c. the data path: FP32 Trainer loop with batches gathered on the CPU and copied from pageable
#      memory (the old path), from pinned memory, with the data set resident on the GPU (the
#      default now), resident + channels_last inputs, and a batch already on the GPU;
#   2d. layout: eager fp32, W4A4 LSQ and W4A4 dampen+freeze, each with NCHW and with channels_last
#      inputs (Trainer.channels_last), one after the other in one process: does channels_last help QAT too?
#   3. a 4-trial search campaign (search.runner.run_campaign: MobileNetV2 W4A4, synthetic data,
#      2 epochs, ASHA) at 0.5 GPU per trial (resources {cpu: 2, gpu: 0.5}), so 2 trials share the GPU;
#      GPU memory/processes are sampled with nvidia-smi while it runs;
#   4. a results table (and JSON with --json FILE; default $OUT/gpu_check.json when $OUT is set).
#
# Run it from anywhere; it cds to the repo root. Python: $PYTHON, else .venv/bin/python, else a
# python3 that imports torch (repo root on PYTHONPATH), else `bash scripts/setup.sh` first. A machine
# without pip access can take missing packages as wheels in ./.whl (installed to /tmp/site).
#
#   bash bench/gpu_check.sh [--json FILE] [--dry-run]
#   CPU_OK=1 bash bench/gpu_check.sh      # = --dry-run: tiny sizes, CPU allowed; checks the logic only
#   GPU_CHECK_SECTIONS="env throughput compiled datapath layout campaign"   # the default: all, in this order
#   GPU_CHECK_ROWS="compiled w4a4 dampen+freeze,..."   # measure only the named rows of each section
#   GPU_CHECK_CAP_compiled=400   # one section's cap in seconds (default caps: env 60, throughput 110,
#                                # compiled 230, datapath 60, layout 80, campaign 150), still bounded by the budget
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

DRY=${CPU_OK:-0}
JSON=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --json) JSON="$2"; shift ;;
    --json=*) JSON="${1#--json=}" ;;
    -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$JSON" ] && [ -n "${OUT:-}" ]; then JSON="$OUT/gpu_check.json"; fi
[ "$DRY" = "1" ] && DRY=1 || DRY=0

BUDGET_S=${GPU_CHECK_BUDGET_S:-560}   # whole script, seconds (under 10 minutes)
if [ "$DRY" = 1 ]; then BUDGET_S=${GPU_CHECK_BUDGET_S:-1500}; fi  # a CPU dry run: compiling takes longer there
SECTIONS=${GPU_CHECK_SECTIONS:-env throughput compiled datapath layout campaign}
START=$SECONDS
left() { echo $(( BUDGET_S - (SECONDS - START) )); }
log() { echo "[$(date +%H:%M:%S) +$((SECONDS - START))s] $*"; }

WORK=$(mktemp -d /tmp/oscqat-gpu.XXXXXX)
SMI_PID=""
cleanup() {
  if [ -n "$SMI_PID" ]; then kill "$SMI_PID" 2>/dev/null; fi
  if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then   # logs back to the caller, two levels down at most
    mkdir -p "$OUT/gpu_check_logs" && cp "$WORK"/*.log "$OUT/gpu_check_logs/" 2>/dev/null
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

# --- Python -------------------------------------------------------------------------------
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  log "installing carried wheels from .whl/ into /tmp/site"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
PY=${PYTHON:-}
if [ -z "$PY" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
if [ -z "$PY" ] && command -v python3 >/dev/null && python3 -c "import torch" 2>/dev/null; then PY=python3; fi
if [ -z "$PY" ]; then
  log "no Python with torch found: running scripts/setup.sh"
  bash scripts/setup.sh && PY=.venv/bin/python
fi
if [ -z "$PY" ]; then echo "no usable Python (set PYTHON=...)" >&2; exit 1; fi
export GPU_CHECK_DRY=$DRY GPU_CHECK_WORK=$WORK

# --- the Python parts (one file, one subcommand per section) -------------------------------------
cat > "$WORK/gpu_check.py" <<'PYEOF'
"""Sections of bench/gpu_check.sh; each writes WORK/<section>.json."""
import json, os, platform, statistics, sys, time
from pathlib import Path

WORK = Path(os.environ["GPU_CHECK_WORK"])
DRY = os.environ.get("GPU_CHECK_DRY") == "1"
SECTIONS = os.environ.get("GPU_CHECK_SECTIONS", "env throughput compiled datapath layout campaign").split()
ROWS = [r.strip() for r in os.environ.get("GPU_CHECK_ROWS", "").split(",") if r.strip()]  # empty: every row


def dump(name, data):
    (WORK / f"{name}.json").write_text(json.dumps(data, indent=2, default=str))


def env():
    import importlib
    out = {"python": platform.python_version(), "executable": sys.executable, "dry_run": DRY, "packages": {}}
    for mod in ("torch", "torchvision", "timm", "pydantic", "yaml", "sklearn", "ray", "optuna", "mlflow", "matplotlib",
                "typer", "rich"):
        try:
            m = importlib.import_module(mod)
            out["packages"][mod] = getattr(m, "__version__", "ok")
        except Exception as exc:  # noqa: BLE001
            out["packages"][mod] = f"MISSING ({exc.__class__.__name__})"
    import torch
    out["cuda_available"] = torch.cuda.is_available()
    out["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out["device"] = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "sms": p.multi_processor_count,
                         "capability": f"{p.major}.{p.minor}", "bf16": torch.cuda.is_bf16_supported()}
    need = {"throughput": ("torch", "torchvision", "pydantic", "yaml"), "compiled": ("torch", "torchvision", "pydantic", "yaml"),
            "datapath": ("torch", "torchvision", "pydantic", "yaml"), "layout": ("torch", "torchvision", "pydantic", "yaml"),
            "campaign": ("torch", "torchvision", "pydantic", "yaml", "ray", "optuna", "mlflow", "matplotlib")}
    out["section_missing"] = {sec: [m for m in mods if str(out["packages"][m]).startswith("MISSING")]
                              for sec, mods in need.items()}
    for k, v in out.items():
        print(f"{k}: {v}")
    dump("env", out)
    for sec, missing in out["section_missing"].items():
        (WORK / f"missing_{sec}.txt").write_text(" ".join(missing))
    if not out["cuda_available"] and not DRY:
        print("torch sees no CUDA device (use --dry-run / CPU_OK=1 to check the logic on CPU)", file=sys.stderr)
        return 3
    return 0


class Capped:
    """A loader view yielding at most ``steps`` batches per epoch (same set_epoch interface)."""

    def __init__(self, loader, steps):
        self.loader, self.steps = loader, steps

    def set_epoch(self, epoch):
        self.loader.set_epoch(epoch)

    def stage(self, device):
        return self.loader.stage(device)

    def __len__(self):
        return min(len(self.loader), self.steps)

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i >= self.steps:
                return
            yield batch


class Resident:
    """One batch, already on the device, yielded ``steps`` times: the loop without the data path."""

    def __init__(self, x, y, steps):
        self.x, self.y, self.steps = x, y, steps

    def set_epoch(self, epoch):
        pass

    def __len__(self):
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            yield self.x, self.y


SIZE, BATCH, STEPS, TIMED = (16, 16, 2, 1) if DRY else (224, 128, 10, 2)


def _setup():
    import torch
    from oscqat.config import TrainConfig
    from oscqat.data import build_data

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if DRY:
        torch.set_num_threads(1)
    common = dict(arch="mobilenet_v2", dataset="synthetic", image_size=SIZE, batch_size=BATCH, epochs=100, lr=0.01,
                  quantizer_lr=1e-5, bn_reestimate_batches=0, device=device, seed=0)
    t0 = time.perf_counter()
    data = build_data(TrainConfig(bits="fp32", **common))
    print(f"synthetic data {SIZE}x{SIZE}: {data.train.num_samples} train images, built in {time.perf_counter() - t0:.1f} s")
    return device, common, data


def _sync(device):
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(trainer, device):
    """img/s over TIMED epochs after one warm-up epoch (scale calibration, compilation, cuDNN caches)."""
    trainer.train_one_epoch()
    _sync(device)
    t = time.perf_counter()
    seen = sum(trainer.train_one_epoch()["_samples"] for _ in range(TIMED))
    _sync(device)
    return seen / (time.perf_counter() - t)


def _measure(section, variants, compile_):
    """Rows of (name, bits, method, amp[, channels_last]): the Trainer loop and the batch-on-device
    loop; the JSON is rewritten after every row, so a section cut short by its timeout keeps what it
    measured. channels_last (inputs) is the Trainer's default unless a row names it."""
    import torch
    from oscqat.config import TrainConfig
    from oscqat.data import DataBundle
    from oscqat.trainer import Trainer

    device, common, data = _setup()
    results = {"setup": {"image_size": SIZE, "batch": BATCH, "steps_per_epoch": STEPS, "timed_epochs": TIMED,
                         "device": device, "torch": torch.__version__, "compile": compile_}, "variants": {}}
    for name, bits, method, amp, *layout in variants:
        if ROWS and name not in ROWS:
            continue
        row = {}
        try:
            cfg = TrainConfig(bits=bits, method=method, amp=amp, compile=compile_, **common)
            trainer = Trainer(cfg, data=DataBundle(Capped(data.train, STEPS), data.val, data.test, data.num_classes,
                                                   data.in_chans, data.image_size))
            if layout:
                trainer.channels_last = layout[0]
            row["data_path"] = trainer.data_path
            row["channels_last"] = trainer.channels_last
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            row["trainer_img_s"] = _timed(trainer, device)
            x, y = next(iter(data.train))
            trainer.data = DataBundle(Resident(x.to(device), y.to(device), STEPS), data.val, data.test, data.num_classes,
                                      data.in_chans, data.image_size)
            row["resident_img_s"] = _timed(trainer, device)
            if trainer.compiled is not None:
                row["compile_time_s"] = trainer.compiled.compile_time_s
                row["graphs_compiled"] = trainer.compiled.graphs_compiled
            if device == "cuda":
                row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            del trainer
            if device == "cuda":
                torch.cuda.empty_cache()
        except Exception as exc:  # noqa: BLE001 - report it in the table, carry on
            row["error"] = f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}"
        results["variants"][name] = row
        print(name, {k: (round(v, 1) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        dump(section, results)
    return 0


def throughput():
    return _measure("throughput", [  # name, bits, method, amp
        ("fp32 train", "fp32", "lsq", False), ("fp32 train +bf16", "fp32", "lsq", True),
        ("w4a4 lsq", "w4a4", "lsq", False), ("w4a4 lsq +bf16", "w4a4", "lsq", True),
        ("w4a4 dampen+freeze", "w4a4", "dampen+freeze", False), ("w4a4 dampen+freeze +bf16", "w4a4", "dampen+freeze", True),
    ], compile_=False)


def compiled():
    rows = [  # the GPU target: compiled w4a4 dampen+freeze >= 0.85x eager fp32 train img/s
        ("compiled fp32 train", "fp32", "lsq", False), ("compiled w4a4 dampen+freeze", "w4a4", "dampen+freeze", False),
        ("compiled w4a4 lsq", "w4a4", "lsq", False), ("compiled fp32 train +bf16", "fp32", "lsq", True),
        ("compiled w4a4 dampen+freeze +bf16", "w4a4", "dampen+freeze", True),
    ]
    return _measure("compiled", rows[:2] if DRY else rows, compile_=True)  # a dry run: two CPU compilations are enough


def layout():
    """Eager rows with NCHW and channels_last inputs, pairwise: the layout's effect on QAT."""
    rows = []
    for name, bits, method in (("fp32 train", "fp32", "lsq"), ("w4a4 lsq", "w4a4", "lsq"),
                               ("w4a4 dampen+freeze", "w4a4", "dampen+freeze")):
        rows += [(f"{name} nchw", bits, method, False, False), (f"{name} channels_last", bits, method, False, True)]
    return _measure("layout", rows, compile_=False)


def datapath():
    """The FP32 Trainer loop (eager) over the same batches, fed five ways."""
    import torch
    from oscqat.config import TrainConfig
    from oscqat.data import DataBundle, TensorLoader
    from oscqat.trainer import Trainer

    device, common, data = _setup()
    hx, hy = data.train.x, data.train.y  # on the CPU; each mode below gets its own loader over these tensors
    results = {"setup": {"image_size": SIZE, "batch": BATCH, "steps_per_epoch": STEPS, "timed_epochs": TIMED,
                         "device": device, "model": "mobilenet_v2 fp32 train, eager"}, "modes": {}}

    def loader(pin=False, resident=False):
        tl = TensorLoader(hx, hy, BATCH, shuffle=True, seed=0)
        if resident and device == "cuda":
            tl.x, tl.y = hx.to(device), hy.to(device)
        tl.pin = pin and device == "cuda"
        return tl

    trainer = Trainer(TrainConfig(bits="fp32", **common), data=data)
    x, y = hx[:BATCH], hy[:BATCH]
    modes = [("pageable host batches (old path)", loader(), False), ("pinned host batches", loader(pin=True), False),
             ("resident on the device (default)", loader(resident=True), False),
             ("resident + channels_last inputs", loader(resident=True), True),
             ("one batch already on the device", Resident(x.to(device), y.to(device), STEPS), False)]
    for name, tl, channels_last in modes:
        row = {}
        try:
            trainer.data = DataBundle(Capped(tl, STEPS) if isinstance(tl, TensorLoader) else tl, data.val, data.test,
                                      data.num_classes, data.in_chans, data.image_size)
            trainer.channels_last = channels_last
            row["img_s"] = _timed(trainer, device)
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}"
        results["modes"][name] = row
        print(name, row, flush=True)
        dump("datapath", results)
    return 0


def campaign():
    import tempfile
    import torch
    os.environ.pop("RAY_ADDRESS", None)
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="oqg", dir="/tmp")
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    import logging
    import ray
    from search.campaign import Campaign
    from search.runner import run_campaign
    from search.tracking import TAG, client_for

    gpu = torch.cuda.is_available()
    d = WORK / "campaign"
    spec = {
        "name": "gpu-check", "dataset": "synthetic", "targets": [{"arch": "mobilenet_v2", "bits": "w4a4"}],
        "base": {"image_size": 16 if DRY else 224, "batch_size": 64 if DRY else 128, "bn_reestimate_batches": 2},
        "budget": {"num_samples": 4, "max_epochs": 2, "grace_period": 1, "reduction_factor": 2,
                   "allow_early_rungs": True},  # the mechanics of 2 trials on one GPU, not remedy results
        "resources": {"cpu": 2, "gpu": 0.5} if gpu else {"cpu": 1, "gpu": 0},
        "fp_pretrain": {"epochs": 1}, "confirm": None, "seed": 0, "storage_path": str(d / "ray_results"),
        "mlflow": {"tracking_uri": f"sqlite:///{d}/mlflow.db"}, "optuna_storage": f"sqlite:///{d}/optuna.db",
    }
    camp = Campaign.model_validate(spec)
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    kw = dict(include_dashboard=False, log_to_driver=True, configure_logging=True, logging_level=logging.WARNING)
    ray.init(**kw) if gpu else ray.init(num_cpus=2, **kw)
    print("ray resources:", ray.cluster_resources())
    init_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = run_campaign(camp)
    wall = time.perf_counter() - t0
    client = client_for(camp.mlflow.tracking_uri)
    exp = client.get_experiment_by_name(camp.experiment_name)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG}role` = 'trial'", max_results=100)
    events = sorted([(r.info.start_time, 1) for r in runs] + [(r.info.end_time or r.info.start_time, -1) for r in runs],
                    key=lambda e: (e[0], e[1]))
    cur = peak = 0
    for _, step in events:
        cur += step
        peak = max(peak, cur)
    sps = []
    for r in runs:
        hist = client.get_metric_history(r.info.run_id, "samples_per_s")
        if hist:
            sps.append(hist[-1].value)
    res = results[0]
    out = {"ray_init_s": init_s, "wall_s": wall, "counts": res.counts, "best_val_top1": res.best_val_top1,
           "best_trial": res.best_trial_id, "resources": spec["resources"], "trials_logged": len(runs),
           "max_concurrent_trials_seen": peak, "median_trial_samples_per_s": statistics.median(sps) if sps else None,
           "image_size": spec["base"]["image_size"], "batch_size": spec["base"]["batch_size"]}
    print(out)
    dump("campaign", out)
    ray.shutdown()
    return 0 if sum(res.counts.values()) == 4 and not res.counts.get("FAIL") else 4


def table():
    def load(name):
        p = WORK / f"{name}.json"
        return json.loads(p.read_text()) if p.is_file() else None

    env_, thr, camp = load("env"), load("throughput"), load("campaign")
    comp, dpath, lay = load("compiled"), load("datapath"), load("layout")
    status = json.loads((WORK / "status.json").read_text()) if (WORK / "status.json").is_file() else {}
    smi = {}
    for name in ("throughput", "campaign"):
        p = WORK / f"smi_{name}.csv"
        if p.is_file():
            mem, util, procs = [], [], []
            for line in p.read_text().splitlines():
                parts = [x.strip() for x in line.split(",")]
                try:
                    mem.append(float(parts[0])); util.append(float(parts[1])); procs.append(int(parts[2]))
                except (ValueError, IndexError):
                    continue
            if mem:
                smi[name] = {"max_mem_mib": max(mem), "mean_util_pct": statistics.fmean(util),
                             "max_gpu_processes": max(procs)}
    print("\n" + "=" * 96)
    print(f"oscqat GPU check{' (DRY RUN on ' + ('GPU' if env_ and env_.get('cuda_available') else 'CPU') + ': tiny sizes, numbers mean nothing)' if DRY else ''}")
    print("=" * 96)
    if env_:
        dev = env_.get("device", {})
        print(f"device: {dev.get('name', 'no CUDA device')} ({dev.get('memory_gib', '-')} GiB, {dev.get('sms', '-')} SMs, "
              f"bf16 {dev.get('bf16', '-')}); torch {env_['packages'].get('torch')} (CUDA {env_.get('torch_cuda')}); "
              f"Python {env_['python']}")
        missing = [k for k, v in env_["packages"].items() if str(v).startswith("MISSING")]
        print(f"missing packages: {', '.join(missing) if missing else 'none'}")
    for sec in SECTIONS:
        st = status.get(sec)
        if st and st != "ok":
            print(f"section {sec}: {st}")
    # every "vs fp32" is against eager FP32 training in the Trainer's default layout (channels_last on
    # CUDA): the throughput section's row, else the layout section's row in that layout
    default_cl = bool(env_ and env_.get("cuda_available"))
    ref = ((thr or {}).get("variants", {}).get("fp32 train")
           or (lay or {}).get("variants", {}).get("fp32 train " + ("channels_last" if default_cl else "nchw"), {}))
    for title, sec in (("eager", thr), ("compiled (TrainConfig compile)", comp)):
        if not sec:
            continue
        s = sec["setup"]
        print(f"\nMobileNetV2 training throughput, {title}, synthetic {s['image_size']}x{s['image_size']}, batch "
              f"{s['batch']}, {s['timed_epochs']} x {s['steps_per_epoch']} timed steps after 1 warm-up epoch ({s['device']})")
        print(f"{'variant':<36}{'trainer img/s':>14}{'vs fp32':>9}{'batch-on-device img/s':>23}{'vs fp32':>9}"
              f"{'peak GiB':>10}{'compile s':>11}")
        for name, row in sec["variants"].items():
            if "error" in row:
                print(f"{name:<36}  ERROR {row['error']}")
                continue
            for mode in ("trainer", "resident"):
                if ref.get(f"{mode}_img_s"):
                    row[f"{mode}_vs_fp32"] = row[f"{mode}_img_s"] / ref[f"{mode}_img_s"]
            peak = f"{row['peak_mem_gib']:.1f}" if "peak_mem_gib" in row else "-"
            cs = f"{row['compile_time_s']:.0f}" if "compile_time_s" in row else "-"
            print(f"{name:<36}{row['trainer_img_s']:>14.0f}{row.get('trainer_vs_fp32', float('nan')):>9.2f}"
                  f"{row['resident_img_s']:>23.0f}{row.get('resident_vs_fp32', float('nan')):>9.2f}{peak:>10}{cs:>11}")
    target = (comp or {}).get("variants", {}).get("compiled w4a4 dampen+freeze", {}).get("trainer_vs_fp32")
    if target is not None:
        layout_name = "channels_last" if ref.get("channels_last") else "nchw"
        print(f"GPU target: compiled w4a4 dampen+freeze >= 0.85x eager fp32 train ({layout_name}) img/s: {target:.2f} "
              f"({'met' if target >= 0.85 else 'MISSED'})")
    if lay:
        s = lay["setup"]
        print(f"\nlayout: eager, {s['image_size']}px, batch {s['batch']} ({s['device']}); Trainer loop img/s, NCHW vs "
              f"channels_last inputs")
        print(f"{'variant':<24}{'nchw':>10}{'channels_last':>15}{'cl / nchw':>11}{'cl vs fp32 nchw':>17}")
        v, base = lay["variants"], lay["variants"].get("fp32 train nchw", {}).get("trainer_img_s")
        for name in ("fp32 train", "w4a4 lsq", "w4a4 dampen+freeze"):
            a, b = v.get(f"{name} nchw", {}), v.get(f"{name} channels_last", {})
            if "trainer_img_s" not in a or "trainer_img_s" not in b:
                err = a.get("error") or b.get("error") or "not measured"
                print(f"{name:<24}  {err}")
                continue
            rel = f"{b['trainer_img_s'] / base:.2f}" if base else "-"
            print(f"{name:<24}{a['trainer_img_s']:>10.0f}{b['trainer_img_s']:>15.0f}"
                  f"{b['trainer_img_s'] / a['trainer_img_s']:>11.2f}{rel:>17}")
    if dpath:
        s = dpath["setup"]
        print(f"\ndata path: {s['model']}, {s['image_size']}px, batch {s['batch']} ({s['device']})")
        base = next(iter(dpath["modes"].values()), {}).get("img_s")
        for name, row in dpath["modes"].items():
            if "error" in row:
                print(f"{name:<40}  ERROR {row['error']}")
                continue
            rel = f"{row['img_s'] / base:.2f}x" if base else "-"
            print(f"{name:<40}{row['img_s']:>10.0f} img/s{rel:>8}")
    if camp:
        print(f"\ncampaign: 4 trials MobileNetV2 W4A4 synthetic {camp['image_size']}px, 2 epochs, resources {camp['resources']}")
        best = f"{camp['best_val_top1']:.4f}" if camp["best_val_top1"] is not None else "-"
        sps = camp["median_trial_samples_per_s"]
        sps = f"{sps:.0f}" if sps else "-"
        print(f"  wall {camp['wall_s']:.0f} s (+ ray.init {camp['ray_init_s']:.0f} s); states {camp['counts']}; "
              f"best val_top1 {best}; trials at once (MLflow run overlap): {camp['max_concurrent_trials_seen']}; "
              f"median trial train samples/s {sps}")
    for name, v in smi.items():
        print(f"nvidia-smi during {name}: max {v['max_mem_mib']:.0f} MiB, mean util {v['mean_util_pct']:.0f}%, "
              f"max GPU processes {v['max_gpu_processes']}")
    ok = all(status.get(s) == "ok" for s in SECTIONS)
    print(f"\nresult: {'ALL SECTIONS OK' if ok else 'SOME SECTIONS FAILED (see above and the logs)'}")
    out_json = os.environ.get("GPU_CHECK_JSON")
    if out_json:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps({"env": env_, "throughput": thr, "compiled": comp, "datapath": dpath,
                                            "layout": lay, "campaign": camp, "nvidia_smi": smi, "status": status, "dry_run": DRY},
                                           indent=2, default=str))
        print(f"JSON: {out_json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit({"env": env, "throughput": throughput, "compiled": compiled, "datapath": datapath, "layout": layout,
              "campaign": campaign,
              "table": table}[sys.argv[1]]())
PYEOF

declare -A STATUS
smi_start() {  # sample GPU memory / utilisation / compute processes once a second
  command -v nvidia-smi >/dev/null || return 0
  ( while true; do
      m=$(nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader,nounits 2>/dev/null | head -1)
      p=$(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null | grep -c .)
      echo "$m, $p"
      sleep 1
    done ) > "$WORK/smi_$1.csv" 2>/dev/null &
  SMI_PID=$!
}
smi_stop() { if [ -n "$SMI_PID" ]; then kill "$SMI_PID" 2>/dev/null; wait "$SMI_PID" 2>/dev/null; SMI_PID=""; fi; }

section() {  # name, seconds cap
  local name=$1 cap=$2 t rc
  t=$(left); [ "$t" -gt "$cap" ] && t=$cap
  if [ "$t" -lt 20 ]; then STATUS[$name]="skipped: out of time"; log "$name: skipped (out of time)"; return; fi
  if [ -s "$WORK/missing_$name.txt" ]; then
    STATUS[$name]="skipped: missing Python packages: $(cat "$WORK/missing_$name.txt") (carry wheels in .whl/)"
    log "$name: ${STATUS[$name]}"; return
  fi
  log "$name: starting (up to ${t}s)"
  [ "$name" != env ] && smi_start "$name"
  timeout --signal=TERM --kill-after=15 "$t" "$PY" "$WORK/gpu_check.py" "$name" > "$WORK/$name.log" 2>&1
  rc=$?
  smi_stop
  tail -n 15 "$WORK/$name.log" | sed "s/^/  [$name] /"
  case $rc in
    0) STATUS[$name]="ok" ;;
    124|137) STATUS[$name]="TIMED OUT after ${t}s" ;;
    *) STATUS[$name]="FAILED (exit $rc)" ;;
  esac
  log "$name: ${STATUS[$name]}"
}

log "oscqat GPU check (dry run: $DRY) with $PY in $ROOT; budget ${BUDGET_S}s"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,utilization.gpu --format=csv 2>&1 | sed 's/^/  /'
else
  log "nvidia-smi not found"
fi
declare -A CAP=([env]=60 [throughput]=110 [compiled]=230 [datapath]=60 [layout]=80 [campaign]=150)  # seconds per section
if [ "$DRY" = 1 ]; then CAP[compiled]=900; CAP[campaign]=300; fi  # on a small CPU, compiling and trials take minutes
for name in "${!CAP[@]}"; do  # GPU_CHECK_CAP_<section>=SECONDS overrides one cap (still bounded by the budget)
  v="GPU_CHECK_CAP_$name"; if [ -n "${!v:-}" ]; then CAP[$name]=${!v}; fi
done
for name in $SECTIONS; do
  if [ -z "${CAP[$name]:-}" ]; then echo "unknown section in GPU_CHECK_SECTIONS: $name" >&2; exit 2; fi
done
for name in $SECTIONS; do
  if [ "$name" != env ] && [ "${STATUS[env]:-ok}" != "ok" ] && [ "$DRY" != 1 ]; then
    STATUS[$name]="skipped: environment check failed"; continue
  fi
  section "$name" "${CAP[$name]}"
done
{ sep=""; printf '{'; for name in $SECTIONS; do printf '%s"%s": "%s"' "$sep" "$name" "${STATUS[$name]:-}"; sep=", "; done
  printf '}\n'; } > "$WORK/status.json"
GPU_CHECK_SECTIONS="$SECTIONS" GPU_CHECK_JSON="$JSON" "$PY" "$WORK/gpu_check.py" table
rc=$?
log "done in $((SECONDS - START))s"
exit $rc
